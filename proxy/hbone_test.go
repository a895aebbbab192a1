//lint:file-ignore SA1019 the issue mandates golang.org/x/net/http2: net/http has no ServeConn or NewClientConn over a TLS connection we handshake (and count) ourselves

package proxy

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"golang.org/x/net/http2"
)

// hboneChain is a client sidecar (explicit outbound over HBONE) in front of
// a server sidecar (explicit inbound + HBONE listener) in front of an app.
type hboneChain struct {
	client, server *Proxy
	entry          string // where the client app connects
	dest           string // the server's explicit inbound listener: the CONNECT authority
	hbone          string // the server's HBONE listener
	app            *app
	policyDir      string // the server's policy directory
}

func newHBONEChain(t testing.TB, m *testMesh, handle func(net.Conn), serverPolicy string, serverOpts ...Option) hboneChain {
	t.Helper()
	a := startApp(t, handle)
	st, dir := policyStore(t, serverPolicy)
	server := startProxy(t, m.identity(t, echoID), st, append([]Option{
		WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONE("127.0.0.1:0")}, serverOpts...)...)
	dest, hb := server.Addrs()[0].String(), server.Addrs()[1].String()
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", dest, mustID(t, echoID)),
		WithHBONEOutbound(true), WithHBONEPeer(dest, hb))
	return hboneChain{client: client, server: server, entry: client.Addrs()[0].String(), dest: dest, hbone: hb, app: a, policyDir: dir}
}

// hboneClient is a bare HBONE client with src's identity: one mesh mTLS
// connection to addr speaking HTTP/2.
func hboneClient(t testing.TB, src tlsmgr.Source, addr string) (*http2.ClientConn, error) {
	t.Helper()
	cfg := tlsmgr.ClientConfig(src, nil, "h2")
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: clientWait}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), clientWait)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	cc, err := (&http2.Transport{}).NewClientConn(c)
	if err != nil {
		c.Close()
		return nil, err
	}
	t.Cleanup(func() { cc.Close() })
	return cc, nil
}

// connect sends a CONNECT for authority on cc and returns the answer; the
// stream's request body is w.
func connect(t testing.TB, cc *http2.ClientConn, method, authority string) (*http.Response, *io.PipeWriter) {
	t.Helper()
	pr, pw := io.Pipe()
	ctx, cancel := context.WithTimeout(context.Background(), clientWait)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, method, "https://"+authority, pr)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = authority
	if method == http.MethodConnect {
		req.URL = &url.URL{Host: authority}
	}
	resp, err := cc.RoundTrip(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, authority, err)
	}
	t.Cleanup(func() { resp.Body.Close(); pw.Close() })
	return resp, pw
}

func TestHBONEForwardsBytesIdenticallyWithHalfClose(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, peerAuth("STRICT"))

	payload := make([]byte, 3<<20+17)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	conn := dial(t, c.entry)
	go func() {
		_, _ = conn.Write(payload)
		_ = conn.(*net.TCPConn).CloseWrite() // the echo app answers the rest after our EOF
	}()
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo differs: got %d bytes, want %d", len(got), len(payload))
	}
}

func TestHBONEAppHalfCloseEndsTheStream(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, func(c net.Conn) {
		_, _ = io.WriteString(c, "220 banner\r\n")
	}, "")
	conn := dial(t, c.entry)
	got, err := io.ReadAll(conn) // we never write or half-close: the app's close must reach us
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != "220 banner\r\n" {
		t.Fatalf("got %q", got)
	}
}

func TestHBONEManyAppConnectionsShareOneHandshake(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, peerAuth("STRICT"))
	out, in := handshakes(mesh.DirOutbound, mesh.ResultOK), handshakes(mesh.DirInbound, mesh.ResultOK)

	const sequential, concurrent = 10, 10
	for i := range sequential {
		conn := dial(t, c.entry)
		if err := roundTrip(conn, fmt.Sprintf("ping %d\n", i)); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		conn.Close()
	}
	// Open ones at once, all held open together.
	conns := make([]net.Conn, concurrent)
	for i := range conns {
		conns[i] = dial(t, c.entry)
	}
	var wg sync.WaitGroup
	errs := make(chan error, concurrent)
	for i, conn := range conns {
		wg.Go(func() { errs <- roundTrip(conn, fmt.Sprintf("together %d\n", i)) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "peers show hbone streams", func() bool {
		n := 0
		for _, pi := range c.server.Peers() {
			if pi.Mode == ModeHBONE && pi.PeerSPIFFEID == webID {
				n++
			}
		}
		return n == concurrent
	})
	for _, pi := range c.client.Peers() {
		if pi.Mode != ModeHBONE || pi.PeerSPIFFEID != echoID {
			t.Errorf("client peer %+v: want mode hbone, peer %s", pi, echoID)
		}
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 1 {
		t.Errorf("%d outbound handshakes for %d app connections, want 1", int(d), sequential+concurrent)
	}
	if d := handshakes(mesh.DirInbound, mesh.ResultOK) - in; d != 1 {
		t.Errorf("%d inbound handshakes for %d app connections, want 1", int(d), sequential+concurrent)
	}
	if n := c.client.hbone.pool.size(); n != 1 {
		t.Errorf("pool holds %d connections, want 1", n)
	}
}

func TestHBONEOpensAnotherConnectionPastMaxStreams(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, "", WithHBONEMaxStreams(2))
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	for i := range 3 { // held open: three streams at once
		if err := roundTrip(dial(t, c.entry), fmt.Sprintf("ping %d\n", i)); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 2 {
		t.Errorf("%d handshakes for 3 open streams with 2 per connection, want 2", int(d))
	}
}

func TestHBONEReconnectsAfterPooledConnectionDies(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, "")
	if err := roundTrip(dial(t, c.entry), "first\n"); err != nil {
		t.Fatal(err)
	}
	c.client.hbone.pool.mu.Lock()
	for _, cs := range c.client.hbone.pool.conns {
		for _, hc := range cs {
			hc.c.Close() // as if the peer had gone away
		}
	}
	c.client.hbone.pool.mu.Unlock()
	if err := roundTrip(dial(t, c.entry), "second\n"); err != nil {
		t.Fatalf("after the pooled connection died: %v", err)
	}
}

func TestHBONEPoolClosesIdleConnections(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONE("127.0.0.1:0"))
	dest, hb := server.Addrs()[0].String(), server.Addrs()[1].String()
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst, WithOutboundExplicit("127.0.0.1:0", dest, mustID(t, echoID)),
		WithHBONEOutbound(true), WithHBONEPeer(dest, hb), WithHBONEPoolIdle(200*time.Millisecond))
	conn := dial(t, client.Addrs()[0].String())
	if err := roundTrip(conn, "ping\n"); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	eventually(t, "idle pooled connection closed", func() bool { return client.hbone.pool.size() == 0 })
}

// TestHBONEPolicyMatchesInbound15006 runs the same AuthorizationPolicy
// against the same client over HBONE and over direct mesh mTLS: the
// outcome and the denial reason must be the same.
func TestHBONEPolicyMatchesInbound15006(t *testing.T) {
	m := newMesh(t)
	tests := []struct {
		name     string
		policy   string
		decision string
	}{
		{"deny the client's principal", authzPolicy("DENY", `principals: ["cluster.local/ns/frontend/sa/web"]`), policy.ReasonDeniedByPolicy},
		{"allow only another principal", authzPolicy("ALLOW", `principals: ["cluster.local/ns/other/sa/intruder"]`), policy.ReasonNoAllowMatch},
		{"allow the client's principal", authzPolicy("ALLOW", `principals: ["cluster.local/ns/frontend/sa/web"]`), DecisionAllow},
		{"STRICT, no AuthorizationPolicy", peerAuth("STRICT"), DecisionAllow},
		{"DISABLE still accepts HBONE", peerAuth("DISABLE"), DecisionAllow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newHBONEChain(t, m, echo, tt.policy)
			for _, path := range []struct {
				name, mode string
				try        func() error
			}{
				{"hbone", ModeHBONE, func() error { return roundTrip(dial(t, c.entry), "ping\n") }},
				{"15006", mesh.ModeMTLS, func() error { return meshClient(m.identity(t, webID))(t, c.dest) }},
			} {
				if tt.policy == peerAuth("DISABLE") && path.mode == mesh.ModeMTLS {
					continue // DISABLE passes mesh mTLS through to the app untouched
				}
				conns, denied := connections(mesh.DirInbound, path.mode, tt.decision), denials(tt.decision)
				err := path.try()
				if tt.decision == DecisionAllow {
					if err != nil {
						t.Fatalf("%s: allowed client refused: %v", path.name, err)
					}
				} else {
					if err == nil {
						t.Fatalf("%s: denied client got through", path.name)
					}
					eventually(t, path.name+" denial counted", func() bool { return denials(tt.decision) == denied+1 })
				}
				eventually(t, path.name+" connection counted", func() bool {
					return connections(mesh.DirInbound, path.mode, tt.decision) == conns+1
				})
			}
		})
	}
}

func TestHBONEDeniedStreamGets403(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, authzPolicy("DENY", `principals: ["cluster.local/ns/frontend/sa/web"]`))
	cc, err := hboneClient(t, m.identity(t, webID), c.hbone)
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := connect(t, cc, http.MethodConnect, c.dest)
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("status %d, want 403", resp.StatusCode)
	}
	refused := connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused)
	conn := dial(t, c.entry)
	if _, err := io.ReadAll(conn); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Logf("client side: %v", err)
	}
	eventually(t, "outbound peer_refused counted", func() bool {
		return connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused) == refused+1
	})
}

func TestHBONEPolicyChangeAppliesToPooledConnection(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, peerAuth("PERMISSIVE"))
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	if err := roundTrip(dial(t, c.entry), "before\n"); err != nil {
		t.Fatal(err)
	}
	open := dial(t, c.entry) // an established stream keeps going across the change
	if err := roundTrip(open, "open\n"); err != nil {
		t.Fatal(err)
	}
	denied := denials(policy.ReasonDeniedByPolicy)
	writePolicy(t, c.policyDir, authzPolicy("DENY", `principals: ["cluster.local/ns/frontend/sa/web"]`))
	eventually(t, "new stream denied", func() bool {
		return roundTrip(dial(t, c.entry), "after\n") != nil
	})
	if denials(policy.ReasonDeniedByPolicy) <= denied {
		t.Error("denial not counted")
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 1 {
		t.Errorf("%d handshakes, want 1: the change must apply on the pooled connection", int(d))
	}
	if err := roundTrip(open, "still open\n"); err != nil {
		t.Errorf("established stream: %v", err)
	}
}

func TestHBONERefusesPeerFromAnotherRoot(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, "")
	stranger := tlsmgr.NewStatic(testpki.New(t, "cluster.local").Issue(t, webID, time.Hour), m.ca.Bundle())
	failed := handshakes(mesh.DirInbound, mesh.ResultUnknownAuthority)
	if _, err := hboneClient(t, stranger, c.hbone); err == nil {
		// TLS 1.3: the client may finish before the server's verdict arrives.
		eventually(t, "server refusal", func() bool { return handshakes(mesh.DirInbound, mesh.ResultUnknownAuthority) == failed+1 })
	}
	eventually(t, "handshake failure counted", func() bool { return handshakes(mesh.DirInbound, mesh.ResultUnknownAuthority) == failed+1 })
	if n := c.app.Accepted(); n != 0 {
		t.Errorf("app accepted %d connections", n)
	}
}

// TestHBONEIsNotAnOpenRelay sends CONNECTs for places that are not this
// workload's app: none may be dialed.
func TestHBONEIsNotAnOpenRelay(t *testing.T) {
	m := newMesh(t)
	c := newHBONEChain(t, m, echo, "")
	bystander := startApp(t, echo) // a real listener on loopback that is not configured
	cc, err := hboneClient(t, m.identity(t, webID), c.hbone)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, method, authority string
		status                  int
		decision                string
	}{
		{"an unconfigured local service", http.MethodConnect, bystander.addr(), http.StatusForbidden, DecisionBadDestination},
		{"the admin port", http.MethodConnect, "127.0.0.1:15000", http.StatusForbidden, DecisionBadDestination},
		{"the HBONE listener itself", http.MethodConnect, c.hbone, http.StatusForbidden, DecisionBadDestination},
		{"another host", http.MethodConnect, "192.0.2.10:80", http.StatusForbidden, DecisionBadDestination},
		{"a host name", http.MethodConnect, "example.com:443", http.StatusBadRequest, DecisionBadRequest},
		{"not CONNECT", http.MethodGet, c.dest, http.StatusMethodNotAllowed, DecisionBadRequest},
		{"the inbound listener", http.MethodConnect, c.dest, http.StatusOK, DecisionAllow},
		{"the app address", http.MethodConnect, c.app.addr(), http.StatusOK, DecisionAllow},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := connections(mesh.DirInbound, ModeHBONE, tt.decision)
			resp, w := connect(t, cc, tt.method, tt.authority)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.status)
			}
			if tt.status == http.StatusOK {
				go func() { _, _ = io.WriteString(w, "ping\n") }()
				got := make([]byte, 5)
				if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != "ping\n" {
					t.Fatalf("echo %q, %v", got, err)
				}
			}
			eventually(t, "counted", func() bool { return connections(mesh.DirInbound, ModeHBONE, tt.decision) == before+1 })
		})
	}
	if n := bystander.Accepted(); n != 0 {
		t.Errorf("the unconfigured service was reached %d times", n)
	}
}

func TestHBONETransparentTargetIsThisPodOnly(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	p := startProxy(t, m.identity(t, echoID), st, WithInboundTransparent("127.0.0.1:0"),
		WithOriginalDst(fixedDst("127.0.0.1:1")), WithHBONE("127.0.0.1:0"))
	own := p.Addrs()[0].(*net.TCPAddr).Port
	pod := netip.MustParseAddr("10.0.0.5")
	tests := []struct {
		authority string
		local     netip.Addr
		ok        bool
	}{
		{"10.0.0.5:8080", pod, true},
		{"[::ffff:10.0.0.5]:8080", pod, true},
		{"10.0.0.6:8080", pod, false},                 // another host
		{"10.0.0.5:15020", pod, false},                // the proxy's own ports
		{"10.0.0.5:15008", pod, false},                // HBONE itself
		{fmt.Sprintf("10.0.0.5:%d", own), pod, false}, // a listener of this proxy
		{"127.0.0.1:8080", netip.MustParseAddr("127.0.0.1"), false},
		{"0.0.0.0:8080", netip.MustParseAddr("0.0.0.0"), false},
		{"app:8080", pod, false},
	}
	for _, tt := range tests {
		dest, port, err := p.hboneTarget(tt.authority, tt.local)
		if (err == nil) != tt.ok {
			t.Errorf("hboneTarget(%s, local %s) = %s, %v; want ok=%v", tt.authority, tt.local, dest, err, tt.ok)
			continue
		}
		if tt.ok && (dest != "10.0.0.5:8080" || port != 8080) {
			t.Errorf("hboneTarget(%s) = %s, %d", tt.authority, dest, port)
		}
	}
}

func TestHBONEUnreachableAppGets503(t *testing.T) {
	m := newMesh(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := ln.Addr().String()
	ln.Close()
	st, _ := policyStore(t, "")
	server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", gone), WithHBONE("127.0.0.1:0"))
	cc, err := hboneClient(t, m.identity(t, webID), server.Addrs()[1].String())
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := connect(t, cc, http.MethodConnect, gone)
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", resp.StatusCode)
	}
}

// BenchmarkHBONENewConnection is BenchmarkProxyHandshake over HBONE: each
// app connection is a new CONNECT stream on the pooled mTLS connection
// instead of a handshake. Compare their conns/s.
func BenchmarkHBONENewConnection(b *testing.B) {
	m := newMesh(b)
	c := newHBONEChain(b, m, echo, peerAuth("STRICT"))
	benchNewConnections(b, c.entry)
}

// BenchmarkDirectNewConnection is the same chain without HBONE: a mesh
// mTLS handshake per app connection.
func BenchmarkDirectNewConnection(b *testing.B) {
	m := newMesh(b)
	a := startApp(b, echo)
	st, _ := policyStore(b, peerAuth("STRICT"))
	server := startProxy(b, m.identity(b, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	cst, _ := policyStore(b, "")
	client := startProxy(b, m.identity(b, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(b, echoID)))
	benchNewConnections(b, client.Addrs()[0].String())
}

// benchNewConnections opens an app connection to entry per iteration and
// moves one byte each way.
func benchNewConnections(b *testing.B, entry string) {
	buf := make([]byte, 1)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", entry)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write([]byte{'x'}); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
}
