package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	fwd "github.com/meshproxy/meshproxy/proxy/forward"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// chain is a client-side sidecar (explicit outbound) in front of a
// server-side sidecar (explicit inbound) in front of an app.
type chain struct {
	client, server *Proxy
	entry          string // where the client app connects
}

func newChain(t *testing.T, m *testMesh, handle func(net.Conn), serverPolicy string, opts ...Option) chain {
	t.Helper()
	a := startApp(t, handle)
	st, _ := policyStore(t, serverPolicy)
	server := startProxy(t, m.identity(t, echoID), st, append([]Option{WithInboundExplicit("127.0.0.1:0", a.addr())}, opts...)...)
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst, append([]Option{
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(t, echoID))}, opts...)...)
	return chain{client: client, server: server, entry: client.Addrs()[0].String()}
}

func authzPolicy(action, from string) string {
	return peerAuth("PERMISSIVE") + fmt.Sprintf(`---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: %s-policy
  namespace: default
spec:
  action: %s
  rules:
  - from:
    - source:
        %s
`, strings.ToLower(action), action, from)
}

func TestAuthorizationByPrincipalAndNamespace(t *testing.T) {
	m := newMesh(t)
	server := m.identity(t, echoID)
	web, intruder := m.identity(t, webID), m.identity(t, otherID)
	a := startApp(t, echo)

	tests := []struct {
		name     string
		policy   string
		dial     func(testing.TB, string) error
		mode     string
		decision string // allow, or the denial reason
	}{
		{"allow principal admits it", authzPolicy("ALLOW", `principals: ["cluster.local/ns/frontend/sa/web"]`), meshClient(web), mesh.ModeMTLS, DecisionAllow},
		{"allow principal refuses another", authzPolicy("ALLOW", `principals: ["cluster.local/ns/frontend/sa/web"]`), meshClient(intruder), mesh.ModeMTLS, policy.ReasonNoAllowMatch},
		{"allow principal refuses plaintext", authzPolicy("ALLOW", `principals: ["cluster.local/ns/frontend/sa/web"]`), plaintextClient, mesh.ModePlaintext, policy.ReasonNoAllowMatch},
		{"allow namespace admits it", authzPolicy("ALLOW", `namespaces: ["frontend"]`), meshClient(web), mesh.ModeMTLS, DecisionAllow},
		{"allow namespace refuses another", authzPolicy("ALLOW", `namespaces: ["frontend"]`), meshClient(intruder), mesh.ModeMTLS, policy.ReasonNoAllowMatch},
		{"deny namespace refuses it", authzPolicy("DENY", `namespaces: ["other"]`), meshClient(intruder), mesh.ModeMTLS, policy.ReasonDeniedByPolicy},
		{"deny namespace admits another", authzPolicy("DENY", `namespaces: ["other"]`), meshClient(web), mesh.ModeMTLS, DecisionAllow},
		{"deny principal refuses it", authzPolicy("DENY", `principals: ["cluster.local/ns/other/sa/intruder"]`), meshClient(intruder), mesh.ModeMTLS, policy.ReasonDeniedByPolicy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, _ := policyStore(t, tt.policy)
			p := startProxy(t, server, st, WithInboundExplicit("127.0.0.1:0", a.addr()))
			conns := connections(mesh.DirInbound, tt.mode, tt.decision)
			denied := denials(tt.decision)

			err := tt.dial(t, p.Addrs()[0].String())
			if tt.decision == DecisionAllow {
				if err != nil {
					t.Fatalf("allowed client refused: %v", err)
				}
			} else {
				if err == nil {
					t.Fatal("denied client got through")
				}
				eventually(t, "denial counted", func() bool { return denials(tt.decision) == denied+1 })
			}
			eventually(t, "connection counted", func() bool { return connections(mesh.DirInbound, tt.mode, tt.decision) == conns+1 })
		})
	}
}

func TestOutboundVerifiesServerIdentity(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	serverAddr := server.Addrs()[0].String()

	tests := []struct {
		name   string
		want   string // expected server ID; "" = any in our trust domain
		policy string // the client side's policy
		ok     bool
		result string
	}{
		{"expected id", echoID, "", true, mesh.ResultOK},
		{"any member of the trust domain", "", "", true, mesh.ResultOK},
		{"wrong id is refused", otherID, "", false, mesh.ResultWrongIdentity},
		{"rule SANs apply without an expected id", "", destRule("127.0.0.1", "ISTIO_MUTUAL", `"`+echoID+`"`), true, mesh.ResultOK},
		{"rule SANs naming another server refuse it", "", destRule("127.0.0.1", "ISTIO_MUTUAL", `"`+otherID+`"`), false, mesh.ResultWrongIdentity},
		{"expected id wins over rule SANs", echoID, destRule("127.0.0.1", "ISTIO_MUTUAL", `"`+otherID+`"`), true, mesh.ResultOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want spiffeid.ID
			if tt.want != "" {
				want = mustID(t, tt.want)
			}
			cst, _ := policyStore(t, tt.policy)
			client := startProxy(t, m.identity(t, webID), cst, WithOutboundExplicit("127.0.0.1:0", serverAddr, want))
			hs := handshakes(mesh.DirOutbound, tt.result)
			refused := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionHandshakeFailed)

			err := plaintextClient(t, client.Addrs()[0].String())
			if tt.ok != (err == nil) {
				t.Fatalf("round trip error = %v, want ok=%v", err, tt.ok)
			}
			eventually(t, "handshake counted", func() bool { return handshakes(mesh.DirOutbound, tt.result) == hs+1 })
			if !tt.ok {
				eventually(t, "refusal counted", func() bool {
					return connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionHandshakeFailed) == refused+1
				})
			}
		})
	}
}

// mapDialer sends every dial for a 10.0.0.0/8 address to 127.0.0.1 on the
// same port, so transparent-outbound tests reach loopback servers while the
// proxy believes it is talking to a pod network.
type mapDialer struct{ net.Dialer }

func (d *mapDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	if !netip.MustParsePrefix("10.0.0.0/8").Contains(ap.Addr()) {
		return nil, fmt.Errorf("test dialer: refusing %s outside 10.0.0.0/8", addr)
	}
	return d.Dialer.DialContext(ctx, network, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port()).String())
}

func destRule(host, mode, sans string) string {
	return fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: rule
  namespace: default
spec:
  host: %s
  trafficPolicy:
    tls:
      mode: %s
      subjectAltNames: [%s]
`, host, mode, sans)
}

func TestTransparentOutboundChoosesMTLSOrPassthrough(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	meshPort := server.Addrs()[0].(*net.TCPAddr).Port // STRICT: only mesh mTLS gets through
	appPort := int(a.Port())                          // plaintext: only passthrough gets through

	tests := []struct {
		name     string
		policy   string
		dst      string
		mode     string
		decision string
		ok       bool
	}{
		{"mesh cidr gets mTLS", "", fmt.Sprintf("10.1.0.5:%d", meshPort), mesh.ModeMTLS, DecisionAllow, true},
		{"outside the mesh passes through", "", fmt.Sprintf("10.200.0.5:%d", appPort), mesh.ModePassthrough, DecisionAllow, true},
		{"ISTIO_MUTUAL rule outside mesh cidrs gets mTLS", destRule("10.200.0.0/16", "ISTIO_MUTUAL", `"`+echoID+`"`),
			fmt.Sprintf("10.200.0.5:%d", meshPort), mesh.ModeMTLS, DecisionAllow, true},
		{"rule SANs naming another server refuse it", destRule("10.1.0.0/16", "ISTIO_MUTUAL", `"`+otherID+`"`),
			fmt.Sprintf("10.1.0.5:%d", meshPort), mesh.ModeMTLS, DecisionHandshakeFailed, false},
		{"DISABLE rule inside mesh cidrs passes through", destRule("10.1.0.0/16", "DISABLE", ""),
			fmt.Sprintf("10.1.0.5:%d", appPort), mesh.ModePassthrough, DecisionAllow, true},
		{"loopback destination is a loop", "", a.addr(), mesh.ModeUnknown, DecisionLoop, false},
		{"mesh-wide wildcard host covers a mesh destination", destRule(`"*.svc.cluster.local"`, "DISABLE", ""),
			fmt.Sprintf("10.1.0.5:%d", appPort), mesh.ModePassthrough, DecisionAllow, true},
		{"mesh-wide wildcard host leaves other destinations alone", destRule(`"*.local"`, "ISTIO_MUTUAL", ""),
			fmt.Sprintf("10.200.0.5:%d", appPort), mesh.ModePassthrough, DecisionAllow, true},
		{"a rejected TLS-origination rule refuses rather than send plaintext", destRule("10.200.0.0/16", "SIMPLE\n      caCrl: /crl.pem", ""),
			fmt.Sprintf("10.200.0.5:%d", appPort), mesh.ModeUnknown, DecisionDestinationRuleRejected, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cst, _ := policyStore(t, tt.policy)
			client := startProxy(t, m.identity(t, webID), cst,
				WithOutboundTransparent("127.0.0.1:0"),
				WithOriginalDst(fixedDst(tt.dst)),
				WithMeshCIDRs([]netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}),
				WithDialer(&mapDialer{}))
			before := connections(mesh.DirOutbound, tt.mode, tt.decision)
			err := plaintextClient(t, client.Addrs()[0].String())
			if tt.ok != (err == nil) {
				t.Fatalf("round trip error = %v, want ok=%v", err, tt.ok)
			}
			eventually(t, "connection counted", func() bool { return connections(mesh.DirOutbound, tt.mode, tt.decision) == before+1 })
		})
	}
}

func TestOutboundSendsIstioALPNAndSNI(t *testing.T) {
	m := newMesh(t)
	server := m.identity(t, echoID)
	type hello struct {
		sni  string
		alpn []string
	}
	hellos := make(chan hello, 1)
	cfg := tlsmgr.ServerConfig(server, nil)
	cfg.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		hellos <- hello{h.ServerName, h.SupportedProtos}
		return nil, nil
	}
	a := startApp(t, func(c net.Conn) {
		tc := tls.Server(c, cfg)
		if tc.Handshake() == nil {
			echo(tc)
		}
	})
	port := int(a.Port())
	st, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), st,
		WithOutboundExplicit("127.0.0.1:0", fmt.Sprintf("localhost:%d", port), spiffeid.ID{}))
	if err := plaintextClient(t, client.Addrs()[0].String()); err != nil {
		t.Fatal(err)
	}
	h := <-hellos
	if want := fmt.Sprintf("outbound_.%d_._.localhost", port); h.sni != want {
		t.Errorf("SNI = %q, want %q", h.sni, want)
	}
	if len(h.alpn) != 1 || h.alpn[0] != tlsmgr.ALPNIstio {
		t.Errorf("ALPN = %q, want [istio]", h.alpn)
	}
}

func TestHalfCloseBothWays(t *testing.T) {
	m := newMesh(t)

	t.Run("client finishes sending first", func(t *testing.T) {
		// The app reads to EOF, then answers: only a propagated half-close gets it there.
		c := newChain(t, m, func(c net.Conn) {
			got, err := io.ReadAll(c)
			if err != nil {
				return
			}
			_, _ = fmt.Fprintf(c, "got %d bytes", len(got))
		}, peerAuth("STRICT"))
		conn := dial(t, c.entry)
		if _, err := io.WriteString(conn, "hello"); err != nil {
			t.Fatal(err)
		}
		if err := fwd.CloseWrite(conn); err != nil {
			t.Fatal(err)
		}
		reply, err := io.ReadAll(conn)
		if err != nil || string(reply) != "got 5 bytes" {
			t.Fatalf("reply = %q, %v", reply, err)
		}
	})

	t.Run("server finishes sending first", func(t *testing.T) {
		late := make(chan string, 1)
		c := newChain(t, m, func(c net.Conn) {
			if _, err := io.WriteString(c, "bye"); err != nil {
				return
			}
			_ = fwd.CloseWrite(c)
			got, _ := io.ReadAll(c)
			late <- string(got)
		}, peerAuth("STRICT"))
		conn := dial(t, c.entry)
		got, err := io.ReadAll(conn) // EOF arrives while our write side is still open
		if err != nil || string(got) != "bye" {
			t.Fatalf("read = %q, %v", got, err)
		}
		if _, err := io.WriteString(conn, "still here"); err != nil {
			t.Fatalf("write after the server's half-close: %v", err)
		}
		_ = fwd.CloseWrite(conn)
		if s := <-late; s != "still here" {
			t.Fatalf("app received %q after its half-close", s)
		}
	})
}

func TestLargeTransferArrivesByteIdentical(t *testing.T) {
	size := int64(100 << 20)
	if testing.Short() {
		size = 8 << 20
	}
	m := newMesh(t)
	c := newChain(t, m, func(c net.Conn) {
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil {
			return
		}
		_, _ = fmt.Fprintf(c, "%d %x", n, h.Sum(nil))
	}, peerAuth("STRICT"))
	bytesBefore := testutilBytes(mesh.DirInbound)

	conn, err := net.Dial("tcp", c.entry)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Minute))
	h := sha256.New()
	src := io.TeeReader(io.LimitReader(rand.NewChaCha8([32]byte{1}), size), h)
	if _, err := io.Copy(conn, src); err != nil {
		t.Fatal(err)
	}
	_ = fwd.CloseWrite(conn)
	reply, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%d %s", size, hex.EncodeToString(h.Sum(nil))); string(reply) != want {
		t.Fatalf("app saw %q, sent %q", reply, want)
	}
	if got := testutilBytes(mesh.DirInbound) - bytesBefore; got < float64(size) {
		t.Fatalf("bytes_total{inbound} grew by %.0f, want at least %d", got, size)
	}
}

func TestPolicyChangeAppliesToNewConnections(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, dir := policyStore(t, peerAuth("STRICT"))
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	addr := p.Addrs()[0].String()

	// A mesh connection opened under STRICT survives the change.
	long := tls.Client(dial(t, addr), meshClientConfig(m.identity(t, webID)))
	if err := roundTrip(long, "before\n"); err != nil {
		t.Fatal(err)
	}
	if err := plaintextClient(t, addr); err == nil {
		t.Fatal("plaintext got through STRICT")
	}
	gen := st.Current().Generation()
	writePolicy(t, dir, peerAuth("PERMISSIVE"))
	eventually(t, "policy reload", func() bool { return st.Current().Generation() > gen })
	if err := plaintextClient(t, addr); err != nil {
		t.Fatalf("plaintext refused after switching to PERMISSIVE: %v", err)
	}
	if err := roundTrip(long, "after\n"); err != nil {
		t.Fatalf("existing connection broken by the reload: %v", err)
	}
}

func TestShutdownDrainsInFlightTransfer(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	p := New(m.identity(t, echoID), st, WithLogger(quietLog), WithInboundExplicit("127.0.0.1:0", a.addr()))
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	addr := p.Addrs()[0].String()
	conn := dial(t, addr)
	if err := roundTrip(conn, "first half\n"); err != nil {
		t.Fatal(err)
	}

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), clientWait)
		defer cancel()
		done <- p.Shutdown(ctx)
	}()
	eventually(t, "listener closed", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	if p.Ready() == nil {
		t.Error("Ready() = nil while draining")
	}
	// The transfer in flight continues, then ends cleanly.
	if err := roundTrip(conn, "second half\n"); err != nil {
		t.Fatalf("in-flight connection broken by drain: %v", err)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a connection open", err)
	default:
	}
	_ = fwd.CloseWrite(conn)
	if rest, err := io.ReadAll(conn); err != nil || len(rest) != 0 {
		t.Fatalf("end of stream = %q, %v", rest, err)
	}
	conn.Close()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

func TestShutdownClosesConnectionsAtDeadline(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	p := New(m.identity(t, echoID), st, WithLogger(quietLog), WithInboundExplicit("127.0.0.1:0", a.addr()))
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, p.Addrs()[0].String())
	if err := roundTrip(conn, "hi\n"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := p.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want deadline exceeded", err)
	}
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Fatal("connection still open after the drain deadline")
	}
}

func TestMaxConnectionsRefusesExtraKeepsExisting(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()), WithMaxConnections(1))
	addr := p.Addrs()[0].String()
	first := dial(t, addr)
	if err := roundTrip(first, "one\n"); err != nil {
		t.Fatal(err)
	}
	before := connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit)
	if err := plaintextClient(t, addr); err == nil {
		t.Fatal("second connection admitted past --max-connections=1")
	}
	eventually(t, "over_limit counted", func() bool {
		return connections(mesh.DirInbound, mesh.ModeUnknown, DecisionOverLimit) == before+1
	})
	if err := roundTrip(first, "still one\n"); err != nil {
		t.Fatalf("existing connection hurt by the refusal: %v", err)
	}
}

func TestHelloRefusals(t *testing.T) {
	m := newMesh(t)
	web := m.identity(t, webID)
	bigALPN := []string{tlsmgr.ALPNIstio}
	for i := range 100 {
		bigALPN = append(bigALPN, fmt.Sprintf("%0200d", i))
	}
	hello := captureHello(t, meshClientConfig(web))
	big := meshClientConfig(web)
	big.NextProtos = bigALPN

	tests := []struct {
		name   string
		detect time.Duration
		send   func(net.Conn) error
		result string
	}{
		{"half-sent hello is closed at the detect timeout", 300 * time.Millisecond, func(c net.Conn) error {
			_, err := c.Write(hello[:10])
			return err
		}, mesh.ResultTimeout},
		{"hello over 16 KiB is refused", clientWait, func(c net.Conn) error {
			go func() { _ = tls.Client(c, big).Handshake() }()
			return nil
		}, mesh.ResultBadHello},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := startApp(t, echo)
			st, _ := policyStore(t, "")
			p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()),
				WithDetectTimeout(tt.detect))
			before := handshakes(mesh.DirInbound, tt.result)
			conn := dial(t, p.Addrs()[0].String())
			if err := tt.send(conn); err != nil {
				t.Fatal(err)
			}
			eventually(t, "refusal counted", func() bool { return handshakes(mesh.DirInbound, tt.result) == before+1 })
			if tt.result == mesh.ResultTimeout {
				if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("half-sent hello: connection not closed by the proxy (%v)", err)
				}
			}
		})
	}
}

func TestIdleConnectionIsClosed(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()),
		WithIdleTimeout(200*time.Millisecond))
	conn := dial(t, p.Addrs()[0].String())
	if err := roundTrip(conn, "hi\n"); err != nil {
		t.Fatal(err)
	}
	// The client's own deadline is far away: only the proxy can end this read.
	if _, err := conn.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("idle connection not closed by the proxy: %v", err)
	}
}

func TestPeersShowsBothEnds(t *testing.T) {
	m := newMesh(t)
	c := newChain(t, m, echo, peerAuth("STRICT"))
	conn := dial(t, c.entry)
	msg := "0123456789\n"
	if err := roundTrip(conn, msg); err != nil {
		t.Fatal(err)
	}
	find := func(p *Proxy, dir string) (conntrack.PeerInfo, bool) {
		for _, pi := range p.Peers() {
			if pi.Direction == dir && pi.BytesIn >= int64(len(msg)) && pi.BytesOut >= int64(len(msg)) {
				return pi, true
			}
		}
		return conntrack.PeerInfo{}, false
	}
	var out, in conntrack.PeerInfo
	eventually(t, "outbound peer listed", func() (ok bool) { out, ok = find(c.client, mesh.DirOutbound); return })
	eventually(t, "inbound peer listed", func() (ok bool) { in, ok = find(c.server, mesh.DirInbound); return })
	if out.PeerSPIFFEID != echoID || out.Mode != mesh.ModeMTLS || out.Source != conn.LocalAddr().String() {
		t.Errorf("outbound peer = %+v", out)
	}
	if in.PeerSPIFFEID != webID || in.Mode != mesh.ModeMTLS || in.Since.IsZero() {
		t.Errorf("inbound peer = %+v", in)
	}
	active := func(dir string) float64 { return testutil.ToFloat64(metrics.ConnectionsActive.WithLabelValues(dir)) }
	if active(mesh.DirInbound) < 1 || active(mesh.DirOutbound) < 1 {
		t.Errorf("connections_active = inbound %v, outbound %v while open", active(mesh.DirInbound), active(mesh.DirOutbound))
	}
	conn.Close()
	eventually(t, "peers gone after close", func() bool { return len(c.client.Peers()) == 0 && len(c.server.Peers()) == 0 })
	eventually(t, "connections_active back to zero", func() bool { return active(mesh.DirInbound) == 0 && active(mesh.DirOutbound) == 0 })
}

func TestStartFailureNamesListenerAndUnbindsAll(t *testing.T) {
	m := newMesh(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freeAddr := free.Addr().String()
	free.Close()

	st, _ := policyStore(t, "")
	p := New(m.identity(t, echoID), st, WithLogger(quietLog),
		WithInboundExplicit(freeAddr, "127.0.0.1:9"),
		WithOutboundExplicit(busy.Addr().String(), "127.0.0.1:9", spiffeid.ID{}))
	err = p.Start(context.Background())
	if err == nil || !strings.Contains(err.Error(), "outbound-explicit "+busy.Addr().String()) {
		t.Fatalf("Start error = %v, want it to name the busy listener", err)
	}
	ln, err := net.Listen("tcp", freeAddr)
	if err != nil {
		t.Fatalf("first listener left bound after the failed Start: %v", err)
	}
	ln.Close()

	noDst := New(m.identity(t, echoID), st, WithInboundTransparent("127.0.0.1:0"))
	if err := noDst.Start(context.Background()); err == nil || !strings.Contains(err.Error(), "original-destination") {
		t.Fatalf("Start without WithOriginalDst = %v", err)
	}
}

func TestReadyNeedsListenersAndIdentity(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	src := m.identity(t, echoID)
	p := New(src, st, WithLogger(quietLog), WithInboundExplicit("127.0.0.1:0", "127.0.0.1:9"))
	if p.Ready() == nil {
		t.Fatal("ready before Start")
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown(context.Background())
	if err := p.Ready(); err != nil {
		t.Fatalf("Ready() = %v", err)
	}
	expired := m.ca.IssueLeaf(t, testpki.Leaf{ID: webID, NotBefore: time.Now().Add(-3 * time.Hour), TTL: time.Hour})
	src.Set(expired, m.ca.Bundle())
	if err := p.Ready(); err == nil || !strings.Contains(err.Error(), "identity") {
		t.Fatalf("Ready() with an expired cert = %v", err)
	}
}

// pendingPolicy is a policy source that says whether its policy is in
// effect yet, as the sidecar's policy for the SVID's namespace does.
type pendingPolicy struct {
	mesh.PolicySource
	err atomic.Pointer[error]
}

func (p *pendingPolicy) Ready() error {
	if err := p.err.Load(); err != nil {
		return *err
	}
	return nil
}

// TestReadyWaitsForThePolicySource: a sidecar whose policy is not in effect
// yet is not ready, and says why; it becomes ready when the policy is.
func TestReadyWaitsForThePolicySource(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	pol := &pendingPolicy{PolicySource: st}
	notYet := errors.New("not loaded yet")
	pol.err.Store(&notYet)
	p := New(m.identity(t, echoID), pol, WithLogger(quietLog), WithInboundExplicit("127.0.0.1:0", "127.0.0.1:9"))
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer p.Shutdown(context.Background())
	if err := p.Ready(); err == nil || !strings.Contains(err.Error(), "policy: not loaded yet") {
		t.Fatalf("Ready() with the policy pending = %v", err)
	}
	pol.err.Store(nil)
	if err := p.Ready(); err != nil {
		t.Fatalf("Ready() once the policy is in effect = %v", err)
	}
}

func TestTransparentInboundRefusesLoop(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	var self netip.AddrPort
	var mu sync.Mutex
	p := startProxy(t, m.identity(t, echoID), st, WithInboundTransparent("127.0.0.1:0"),
		WithOriginalDst(func(c net.Conn) (netip.AddrPort, error) {
			mu.Lock()
			defer mu.Unlock()
			return self, nil
		}))
	mu.Lock()
	self = netip.MustParseAddrPort(p.Addrs()[0].String())
	mu.Unlock()
	before := connections(mesh.DirInbound, mesh.ModeUnknown, DecisionLoop)
	if err := plaintextClient(t, self.String()); err == nil {
		t.Fatal("a connection to the capture port itself was forwarded")
	}
	eventually(t, "loop counted", func() bool { return connections(mesh.DirInbound, mesh.ModeUnknown, DecisionLoop) == before+1 })
}

func TestHandshakeDurationObserved(t *testing.T) {
	m := newMesh(t)
	c := newChain(t, m, echo, peerAuth("STRICT"))
	count := func() uint64 {
		var d dto.Metric
		if err := metrics.HandshakeDuration.Write(&d); err != nil {
			t.Fatal(err)
		}
		return d.GetHistogram().GetSampleCount()
	}
	before := count()
	if err := plaintextClient(t, c.entry); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both handshakes timed", func() bool { return count() >= before+2 })
}

func testutilBytes(dir string) float64 {
	return testutil.ToFloat64(metrics.Bytes.WithLabelValues(dir))
}

func TestPolicyPortIsTheDestinationPort(t *testing.T) {
	m := newMesh(t)
	open, closed := startApp(t, echo), startApp(t, echo)
	openPort := int(open.Port())
	st, _ := policyStore(t, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: echo
  namespace: default
spec:
  selector:
    matchLabels:
      app: echo
  mtls:
    mode: STRICT
  portLevelMtls:
    %d:
      mode: PERMISSIVE
`, openPort))
	server := m.identity(t, echoID)
	for _, tt := range []struct {
		name string
		app  *app
		ok   bool
	}{
		{"PERMISSIVE port", open, true},
		{"STRICT port", closed, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			explicit := startProxy(t, server, st, WithInboundExplicit("127.0.0.1:0", tt.app.addr()))
			transparent := startProxy(t, server, st, WithInboundTransparent("127.0.0.1:0"), WithOriginalDst(fixedDst(tt.app.addr())))
			for _, p := range []*Proxy{explicit, transparent} {
				if err := plaintextClient(t, p.Addrs()[0].String()); tt.ok != (err == nil) {
					t.Errorf("plaintext to the %s through %s: %v, want ok=%v", tt.name, p.Addrs()[0], err, tt.ok)
				}
			}
		})
	}
}
