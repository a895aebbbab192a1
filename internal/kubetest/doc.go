// Package kubetest runs a real Kubernetes control plane for tests: etcd (the
// Debian etcd-server package) and kube-apiserver (built from Kubernetes'
// Go module into ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin)
// on loopback, with RBAC authorization, an admin client certificate, and
// service account tokens from the TokenRequest API. No kubelet or
// controllers run: objects are stored and watched, nothing is scheduled.
package kubetest
