// Command coredns is the cluster DNS of meshproxy's single-node test cluster
// (test/cluster): pods resolve meshproxy-ca.istio-system.svc through it. It
// is CoreDNS built with only the plugins test/cluster/coredns.yaml's Corefile
// uses (errors, health, ready, kubernetes, cache) — the way CoreDNS documents
// building with a chosen plugin set — instead of CoreDNS's main package,
// which links every plugin and their cloud SDKs (Route 53, Azure, Cloud DNS,
// etcd…) and doubles a cold build for nothing the cluster uses. It is part
// of the Kubernetes tools module, so the client-go, gRPC and standard
// library packages it shares with Kubernetes compile once;
// test/cluster/tools/build.sh builds it.
package main

import (
	"github.com/coredns/coredns/coremain"

	// The plugins the test cluster's Corefile names. A Corefile naming any
	// other fails at start with CoreDNS's "unknown directive" error.
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
