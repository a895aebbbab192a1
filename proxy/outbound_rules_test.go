package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// nameDialer resolves every *.example.com name to 127.0.0.1 and dials
// addresses as mapDialer does, so explicit destinations by name reach
// loopback servers.
type nameDialer struct{ mapDialer }

func (d *nameDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if strings.HasSuffix(host, ".example.com") {
		return d.Dialer.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
	}
	return d.mapDialer.DialContext(ctx, network, addr)
}

// offlineDNS is the policy stores' resolver: it knows no name (as the
// machine's DNS did not know db.example.com), so no test sends a DNS query
// off the machine; explicit destinations by name are matched by name.
func offlineDNS(_ context.Context, host string) ([]netip.Addr, error) {
	return nil, &net.DNSError{Err: "no such host (test resolver)", Name: host, IsNotFound: true}
}

func originationRule(host, tls string) string {
	return "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: db\n  namespace: default\nspec:\n  host: " + host +
		"\n  trafficPolicy:\n" + tls
}

// TestExplicitOutboundOriginatesTLS: a DestinationRule with tls.mode SIMPLE
// or MUTUAL covering an --outbound-explicit destination (by its name or its
// address) makes the sidecar originate TLS to it, with the destination's
// name as SNI (and the name checked) when the rule sets none; a server the
// rule does not trust is refused, never reached in plaintext.
func TestExplicitOutboundOriginatesTLS(t *testing.T) {
	m := newMesh(t)
	external := testpki.New(t, "external.example")
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	testpki.WriteFile(t, caFile, testpki.PEMCerts(external.Root))
	client := external.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"client.example"}})
	certFile, keyFile, _ := external.WriteSVID(t, dir, client)
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(external.Root)
	simple := tlsEcho(t, external, "db.example.com", nil)
	mutual := tlsEcho(t, external, "db.example.com", clientCAs)

	tests := []struct {
		name, rule, dest string
		ok               bool
		decision         string
	}{
		{"SIMPLE by name, SNI and name check from the destination",
			originationRule("db.example.com", "    tls:\n      mode: SIMPLE\n      caCertificates: "+caFile+"\n"),
			fmt.Sprintf("db.example.com:%d", simple), true, DecisionAllow},
		{"SIMPLE by wildcard name",
			originationRule(`"*.example.com"`, "    tls:\n      mode: SIMPLE\n      caCertificates: "+caFile+"\n"),
			fmt.Sprintf("db.example.com:%d", simple), true, DecisionAllow},
		{"SIMPLE port-level by name",
			originationRule("db.example.com", fmt.Sprintf("    portLevelSettings:\n    - port:\n        number: %d\n      tls:\n        mode: SIMPLE\n        caCertificates: %s\n", simple, caFile)),
			fmt.Sprintf("db.example.com:%d", simple), true, DecisionAllow},
		{"SIMPLE by address with the rule's SNI",
			originationRule("10.200.0.0/16", "    tls:\n      mode: SIMPLE\n      caCertificates: "+caFile+"\n      sni: db.example.com\n"),
			fmt.Sprintf("10.200.0.5:%d", simple), true, DecisionAllow},
		{"MUTUAL by name",
			originationRule("db.example.com", "    tls:\n      mode: MUTUAL\n      caCertificates: "+caFile+"\n      clientCertificate: "+certFile+"\n      privateKey: "+keyFile+"\n"),
			fmt.Sprintf("db.example.com:%d", mutual), true, DecisionAllow},
		{"SIMPLE refuses a server not of the rule's SNI",
			originationRule("db.example.com", "    tls:\n      mode: SIMPLE\n      caCertificates: "+caFile+"\n      sni: other.example.com\n"),
			fmt.Sprintf("db.example.com:%d", simple), false, DecisionHandshakeFailed},
		{"SIMPLE by address without a name verifies the chain only",
			originationRule("10.200.0.0/16", "    tls:\n      mode: SIMPLE\n      caCertificates: "+caFile+"\n"),
			fmt.Sprintf("10.200.0.5:%d", simple), true, DecisionAllow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, _ := policyStore(t, tt.rule)
			p := startProxy(t, m.identity(t, webID), st,
				WithOutboundExplicit("127.0.0.1:0", tt.dest, spiffeid.ID{}), WithDialer(&nameDialer{}), WithHBONEMode(HBONEAuto))
			before := connections(mesh.DirOutbound, ModeTLSOrigination, tt.decision)
			err := plaintextClient(t, p.Addrs()[0].String())
			if (err == nil) != tt.ok {
				t.Fatalf("round trip: %v, want ok=%v", err, tt.ok)
			}
			eventually(t, "counted as TLS origination", func() bool {
				return connections(mesh.DirOutbound, ModeTLSOrigination, tt.decision) == before+1
			})
		})
	}
}

// TestExplicitOutboundConnectionPoolCountsAppConnectionsOverHBONE:
// connectionPool.tcp.maxConnections on an explicit destination counts the
// app's connections even when they ride one pooled HBONE connection.
func TestExplicitOutboundConnectionPoolCountsAppConnectionsOverHBONE(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	sst, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), sst, WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONEMode(HBONEAuto))
	dest := server.Addrs()[0].String()
	cst, _ := policyStore(t, originationRule("127.0.0.1", "    connectionPool:\n      tcp:\n        maxConnections: 1\n"))
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", dest, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	entry := client.Addrs()[0].String()

	pooledBefore := pooled(mesh.DirOutbound)
	first := dial(t, entry)
	defer first.Close()
	if err := roundTrip(first, "one\n"); err != nil {
		t.Fatal(err)
	}
	if pooled(mesh.DirOutbound) != pooledBefore+1 {
		t.Fatalf("the first connection did not ride a pooled HBONE connection (pooled %v → %v)", pooledBefore, pooled(mesh.DirOutbound))
	}
	before := connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull)
	if err := plaintextClient(t, entry); err == nil {
		t.Fatal("a second app connection got through maxConnections: 1 by sharing the pooled HBONE connection")
	}
	eventually(t, "the refusal counted", func() bool {
		return connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull) == before+1
	})
	first.Close()
	eventually(t, "a slot frees when the app connection closes", func() bool { return plaintextClient(t, entry) == nil })
}

// TestCapturedOutboundMatchesDestinationRuleBySNI: for a captured
// connection outside the mesh that no rule covers by address, the server
// name of the app's own ClientHello picks the DestinationRule (here
// *.example.com with maxConnections 1); another name, or plaintext, is
// not covered by it.
func TestCapturedOutboundMatchesDestinationRuleBySNI(t *testing.T) {
	m := newMesh(t)
	external := testpki.New(t, "external.example")
	port := tlsEcho(t, external, "db.example.com", nil)
	st, _ := policyStore(t, originationRule(`"*.example.com"`, "    tls:\n      mode: DISABLE\n    connectionPool:\n      tcp:\n        maxConnections: 1\n"))
	p := startProxy(t, m.identity(t, webID), st,
		WithOutboundTransparent("127.0.0.1:0"),
		WithOriginalDst(fixedDst(fmt.Sprintf("10.200.0.5:%d", port))),
		WithMeshCIDRs([]netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}),
		WithDialer(&mapDialer{}))
	addr := p.Addrs()[0].String()
	roots := x509.NewCertPool()
	roots.AddCert(external.Root)
	appTLS := func(sni string) (*tls.Conn, error) {
		c := tls.Client(dial(t, addr), &tls.Config{RootCAs: roots, ServerName: sni, InsecureSkipVerify: sni != "db.example.com"}) //nolint:gosec // another name on purpose
		if err := c.Handshake(); err != nil {
			c.Close()
			return nil, err
		}
		return c, roundTrip(c, "ping\n")
	}

	first, err := appTLS("db.example.com")
	if err != nil {
		t.Fatalf("app TLS to db.example.com through the sidecar: %v", err)
	}
	defer first.Close()
	before := connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull)
	if c, err := appTLS("api.example.com"); err == nil {
		c.Close()
		t.Fatal("a second connection named *.example.com got through the rule's maxConnections: 1")
	}
	eventually(t, "the refusal counted", func() bool {
		return connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull) == before+1
	})
	other, err := appTLS("db.example.org")
	if err != nil {
		t.Fatalf("a name no rule matches is not limited: %v", err)
	}
	other.Close()
	// Plaintext (no server name) is not limited either: it is passed
	// through to the TLS server, which then drops it.
	full, passed := connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull), connections(mesh.DirOutbound, mesh.ModePassthrough, DecisionAllow)
	_ = plaintextClient(t, addr)
	eventually(t, "plaintext passed through", func() bool {
		return connections(mesh.DirOutbound, mesh.ModePassthrough, DecisionAllow) == passed+1
	})
	if got := connections(mesh.DirOutbound, mesh.ModeUnknown, DecisionConnectionPoolFull); got != full {
		t.Fatalf("plaintext was refused by the *.example.com pool (%v → %v)", full, got)
	}
}

// TestExplicitOutboundWithSPIFFEIDStaysMeshMTLS: a listener naming its
// peer's SPIFFE ID (DEST#ID) reaches a mesh peer with mesh mTLS, even when
// a DestinationRule for the address asks for TLS origination.
func TestExplicitOutboundWithSPIFFEIDStaysMeshMTLS(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	sst, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), sst, WithInboundExplicit("127.0.0.1:0", a.addr()))
	cst, _ := policyStore(t, originationRule("127.0.0.1", "    tls:\n      mode: SIMPLE\n      sni: db.example.com\n"))
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(t, echoID)), WithHBONEMode(HBONENever))
	before := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow)
	if err := plaintextClient(t, client.Addrs()[0].String()); err != nil {
		t.Fatalf("mesh peer named by SPIFFE ID: %v", err)
	}
	eventually(t, "counted as mesh mTLS", func() bool { return connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow) == before+1 })
}
