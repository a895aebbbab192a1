// Package cluster is meshproxy's Kubernetes suite: it brings up a real
// single-node Kubernetes on this machine (up.sh: etcd, containerd, the
// control plane, a kubelet, kube-proxy in nftables mode and CoreDNS, all from
// the binaries `make cluster-tools` builds) and proves on real pods what a
// user of deploy/kubernetes relies on: the CA authenticates pods by
// TokenReview, injected workloads get their identities and reach each other
// over mTLS under STRICT, probes pass, and down.sh leaves the machine as it
// found it. The package has no non-test code besides this file.
//
// It needs root. One cluster runs per machine at a time: the suite holds a
// machine-wide lock while its cluster is up.
package cluster
