package proxy

import (
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// A peer of a federated trust domain passes the handshake (its bundle is
// trusted) but is refused at authorization, with its own reason, until an
// AuthorizationPolicy names its trust domain.
func TestFederatedPeerRefusedUntilAPolicyNamesItsTrustDomain(t *testing.T) {
	m := newMesh(t)
	partner := testpki.New(t, "partner.example")
	server := tlsmgr.NewStatic(m.ca.Issue(t, "spiffe://cluster.local/ns/default/sa/echo", time.Hour), m.ca.Bundle(), partner.Bundle())
	foreignClient := tlsmgr.NewStatic(partner.Issue(t, "spiffe://partner.example/ns/shop/sa/frontend", time.Hour), partner.Bundle(), m.ca.Bundle())
	localClient := m.identity(t, "spiffe://cluster.local/ns/default/sa/client")

	a := startApp(t, echo)
	st, dir := policyStore(t, "")
	p := startProxy(t, server, st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	addr := p.Addrs()[0].String()

	denied, refused := denials("foreign_trust_domain"), connections(mesh.DirInbound, mesh.ModeMTLS, "foreign_trust_domain")
	if err := meshClient(foreignClient)(t, addr); err == nil {
		t.Fatal("a foreign peer got in without a policy naming its trust domain")
	}
	eventually(t, "refusal counted as foreign_trust_domain", func() bool {
		return denials("foreign_trust_domain") == denied+1 && connections(mesh.DirInbound, mesh.ModeMTLS, "foreign_trust_domain") == refused+1
	})
	if err := meshClient(localClient)(t, addr); err != nil {
		t.Fatalf("local peer refused: %v", err)
	}

	writePolicy(t, dir, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: partner
  namespace: default
spec:
  rules:
  - from:
    - source:
        principals: ["partner.example/ns/shop/*", "cluster.local/*"]
`)
	eventually(t, "the policy naming partner.example lets its peer in", func() bool {
		return meshClient(foreignClient)(t, addr) == nil
	})
}
