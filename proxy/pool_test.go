package proxy

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// TestConnectionPoolMaxConnectionsOnOutbound: a DestinationRule's
// connectionPool.tcp.maxConnections bounds the open connections to its
// host; one more is refused and counted, and a slot frees when one closes.
func TestConnectionPoolMaxConnectionsOnOutbound(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: db
  namespace: default
spec:
  host: 10.200.0.0/16
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 2
        connectTimeout: 2s
        tcpKeepalive:
          time: 30s
          interval: 5s
          probes: 3
`)
	client := startProxy(t, m.identity(t, webID), st,
		WithOutboundTransparent("127.0.0.1:0"),
		WithOriginalDst(fixedDst(fmt.Sprintf("10.200.0.5:%d", a.Port()))),
		WithMeshCIDRs([]netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}),
		WithDialer(&mapDialer{}))
	addr := client.Addrs()[0].String()
	first, second := dial(t, addr), dial(t, addr)
	for _, c := range []interface{ Close() error }{first, second} {
		defer c.Close()
	}
	if err := roundTrip(first, "one\n"); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(second, "two\n"); err != nil {
		t.Fatal(err)
	}
	before := connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull)
	if err := plaintextClient(t, addr); err == nil {
		t.Fatal("a third connection got through maxConnections: 2")
	}
	eventually(t, "the refusal counted", func() bool {
		return connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull) == before+1
	})
	first.Close()
	eventually(t, "a slot frees when a connection closes", func() bool { return plaintextClient(t, addr) == nil })
}
