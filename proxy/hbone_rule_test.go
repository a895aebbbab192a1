package proxy

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// An explicit outbound listener without an expected ID takes the server's
// identity from the DestinationRule covering the address reached. When that
// rule changes, new app connections must follow it over HBONE as they do on
// the direct path, even while a pooled connection verified under the old
// rule is still open.
func TestHBONEDestinationRuleChangeAppliesToPooledConnection(t *testing.T) {
	for _, hbone := range []bool{false, true} {
		name := "direct"
		if hbone {
			name = "hbone"
		}
		t.Run(name, func(t *testing.T) {
			m := newMesh(t)
			a := startApp(t, echo)
			st, _ := policyStore(t, peerAuth("STRICT"))
			server := startProxy(t, m.identity(t, echoID), st,
				WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONE("127.0.0.1:0"))
			dest, hb := server.Addrs()[0].String(), server.Addrs()[1].String()
			cst, dir := policyStore(t, destRule("127.0.0.1", "ISTIO_MUTUAL", `"`+echoID+`"`))
			client := startProxy(t, m.identity(t, webID), cst,
				WithOutboundExplicit("127.0.0.1:0", dest, spiffeid.ID{}),
				WithHBONEOutbound(hbone), WithHBONEPeer(dest, hb))
			entry := client.Addrs()[0].String()

			if err := roundTrip(dial(t, entry), "before\n"); err != nil {
				t.Fatalf("under the first rule: %v", err)
			}
			open := dial(t, entry) // keeps the pooled connection busy
			if err := roundTrip(open, "open\n"); err != nil {
				t.Fatal(err)
			}
			writePolicy(t, dir, destRule("127.0.0.1", "ISTIO_MUTUAL", `"`+otherID+`"`))
			reached := netip.MustParseAddrPort(dest)
			eventually(t, "the client's policy to name the other server", func() bool {
				r := cst.Current().Outbound(reached)
				return len(r.SANs) == 1 && r.SANs[0].String() == otherID
			})
			if err := roundTrip(dial(t, entry), "after\n"); err == nil {
				t.Fatal("a new connection reached a server the DestinationRule no longer names")
			}
			if err := roundTrip(open, "still open\n"); err != nil {
				t.Errorf("established connection: %v", err)
			}
		})
	}
}
