// Package certmanagerint runs `meshproxy ca serve --signer certmanager`
// against the real thing: etcd and kube-apiserver v1.37.2 on loopback (no
// kubelet), cert-manager's CRDs, and cert-manager's own controllers (built
// from its Go module in test/certmanager) with a CA issuer. Two real
// `meshproxy run` sidecars get their SVIDs signed through it and carry
// traffic under STRICT.
//
// Binaries come from ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}:
// k8s-v1.37.2/bin/kube-apiserver (built from the test/cluster tools module)
// and cert-manager-v1.21.2/cert-manager-controller (built here from
// test/certmanager when missing); etcd is Debian's etcd-server on PATH.
package certmanagerint
