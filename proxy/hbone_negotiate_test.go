package proxy

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// autoChain is a client sidecar and a server sidecar, both in HBONE auto
// mode, talking over the normal mesh path (explicit listeners, no 15008).
func autoChain(t testing.TB, m *testMesh, handle func(net.Conn), serverPolicy string, serverMode HBONEMode) hboneChain {
	t.Helper()
	a := startApp(t, handle)
	st, dir := policyStore(t, serverPolicy)
	server := startProxy(t, m.identity(t, echoID), st,
		WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONEMode(serverMode))
	dest := server.Addrs()[0].String()
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", dest, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	return hboneChain{client: client, server: server, entry: client.Addrs()[0].String(), dest: dest, app: a, policyDir: dir}
}

func pooled(dir string) float64 {
	return testutil.ToFloat64(metrics.MeshConnections.WithLabelValues(dir, TransportPooled))
}

func TestHBONEAutoPoolsConnectionsBetweenMeshproxyPeers(t *testing.T) {
	m := newMesh(t)
	c := autoChain(t, m, echo, peerAuth("STRICT"), HBONEAuto)
	out, in := handshakes(mesh.DirOutbound, mesh.ResultOK), handshakes(mesh.DirInbound, mesh.ResultOK)
	pooledOut := pooled(mesh.DirOutbound)

	if err := roundTrip(dial(t, c.entry), "first\n"); err != nil {
		t.Fatalf("first connection (stream 1 of the negotiated connection): %v", err)
	}
	const concurrent = 20
	var wg sync.WaitGroup
	errs := make(chan error, concurrent)
	conns := make([]net.Conn, concurrent)
	for i := range conns {
		conns[i] = dial(t, c.entry)
	}
	for i, conn := range conns {
		wg.Go(func() {
			payload := make([]byte, 1+i*37_000)
			_, _ = rand.Read(payload)
			go func() {
				_, _ = conn.Write(payload)
				_ = conn.(*net.TCPConn).CloseWrite()
			}()
			h := sha256.New()
			n, err := io.Copy(h, conn)
			if want := sha256.Sum256(payload); err != nil || !bytes.Equal(h.Sum(nil), want[:]) {
				errs <- fmt.Errorf("connection %d: %d of %d bytes echoed, err %v", i, n, len(payload), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 1 {
		t.Errorf("%d outbound handshakes for %d app connections, want 1", int(d), concurrent+1)
	}
	if d := handshakes(mesh.DirInbound, mesh.ResultOK) - in; d != 1 {
		t.Errorf("%d inbound handshakes for %d app connections, want 1", int(d), concurrent+1)
	}
	if d := pooled(mesh.DirOutbound) - pooledOut; d != 1 {
		t.Errorf("pooled outbound connections went up by %v, want 1", d)
	}
	held := dial(t, c.entry)
	if err := roundTrip(held, "held\n"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*Proxy{c.client, c.server} {
		found := false
		for _, pi := range p.Peers() {
			found = found || pi.Mode == ModeHBONE
			if pi.Mode != ModeHBONE {
				t.Errorf("peer %+v: want mode hbone", pi)
			}
		}
		if !found {
			t.Error("the held connection is not listed as hbone")
		}
	}
}

// The app behind the server ends its direction first; what the client
// sends afterwards must still reach it (HBONE used to drop it).
func TestHBONEAutoHalfCloseByAppFirst(t *testing.T) {
	m := newMesh(t)
	got := make(chan []byte, 1)
	c := autoChain(t, m, func(conn net.Conn) {
		_, _ = io.WriteString(conn, "220 banner\r\n")
		_ = conn.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(conn)
		got <- b
	}, "", HBONEAuto)
	conn := dial(t, c.entry)
	banner, err := io.ReadAll(conn)
	if err != nil || string(banner) != "220 banner\r\n" {
		t.Fatalf("banner %q, %v", banner, err)
	}
	payload := make([]byte, 700_001)
	_, _ = rand.Read(payload)
	if _, err := conn.Write(payload); err != nil {
		t.Fatalf("write after the app's half-close: %v", err)
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	if b := <-got; !bytes.Equal(b, payload) {
		t.Fatalf("app got %d bytes after its half-close, want %d identical", len(b), len(payload))
	}
}

// An Envoy/Istio sidecar offers and selects only "istio": the client in
// auto mode stays per-connection mTLS with it.
func TestHBONEAutoStaysDirectWithIstioOnlyPeer(t *testing.T) {
	m := newMesh(t)
	addr, states := istioOnlyServer(t, m.identity(t, echoID))
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", addr, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	direct := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow)
	for i := range 2 {
		if err := roundTrip(dial(t, client.Addrs()[0].String()), fmt.Sprintf("ping %d\n", i)); err != nil {
			t.Fatalf("connection %d to an istio-only peer: %v", i, err)
		}
		if p := (<-states).NegotiatedProtocol; p != tlsmgr.ALPNIstio {
			t.Fatalf("negotiated %q, want istio", p)
		}
	}
	if d := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow) - direct; d != 2 {
		t.Errorf("%v direct mTLS connections, want 2", d)
	}
	if n := client.hbone.pool.size(); n != 0 {
		t.Errorf("pool holds %d connections to a peer that does not speak HBONE", n)
	}
}

// A meshproxy server with HBONE never does not select the offer.
func TestHBONEAutoStaysDirectWhenServerSaysNever(t *testing.T) {
	m := newMesh(t)
	c := autoChain(t, m, echo, "", HBONENever)
	direct := connections(mesh.DirInbound, mesh.ModeMTLS, DecisionAllow)
	if err := roundTrip(dial(t, c.entry), "ping\n"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a direct inbound connection", func() bool {
		return connections(mesh.DirInbound, mesh.ModeMTLS, DecisionAllow) == direct+1
	})
	if n := c.client.hbone.pool.size(); n != 0 {
		t.Errorf("pool holds %d connections", n)
	}
}

// Policy applies to each stream of a pooled connection, the first one
// included, exactly as to a connection on :15006.
func TestHBONEAutoPolicyDenialOnPooledPath(t *testing.T) {
	m := newMesh(t)
	c := autoChain(t, m, echo, authzPolicy("DENY", `principals: ["cluster.local/ns/frontend/sa/web"]`), HBONEAuto)
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	denied := denials(policy.ReasonDeniedByPolicy)
	inDenied := connections(mesh.DirInbound, ModeHBONE, policy.ReasonDeniedByPolicy)
	refused := connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused)
	for i := range 3 {
		if err := roundTrip(dial(t, c.entry), "ping\n"); err == nil {
			t.Fatalf("connection %d: a denied client got through", i)
		}
	}
	eventually(t, "three denials counted", func() bool {
		return denials(policy.ReasonDeniedByPolicy) == denied+3 &&
			connections(mesh.DirInbound, ModeHBONE, policy.ReasonDeniedByPolicy) == inDenied+3 &&
			connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused) == refused+3
	})
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 1 {
		t.Errorf("%d handshakes: denied streams must not cost the pooled connection", int(d))
	}
	if c.app.Accepted() != 0 {
		t.Errorf("the app was reached %d times", c.app.Accepted())
	}
	writePolicy(t, c.policyDir, peerAuth("STRICT"))
	eventually(t, "allowed after the policy change", func() bool {
		return roundTrip(dial(t, c.entry), "ping\n") == nil
	})
}

func TestHBONEAutoShutdownDrainsStreamsInFlight(t *testing.T) {
	m := newMesh(t)
	c := autoChain(t, m, echo, "", HBONEAuto)
	conn := dial(t, c.entry)
	if err := roundTrip(conn, "before\n"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.server.Shutdown(t.Context()) }()
	eventually(t, "the server to stop accepting", func() bool { return c.server.Ready() != nil })
	// In flight at the GOAWAY: keeps working until it ends.
	if err := roundTrip(conn, "during\n"); err != nil {
		t.Fatalf("stream in flight at shutdown: %v", err)
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	if _, err := io.ReadAll(conn); err != nil {
		t.Fatalf("end of the stream in flight: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
}

// istioOnlyServer is a mesh peer as an Envoy/Istio sidecar is one: plain
// crypto/tls with src's identity, ALPN "istio" only, echoing. Each
// handshake's state is sent on the channel.
func istioOnlyServer(t *testing.T, src tlsmgr.Source) (string, <-chan tls.ConnectionState) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{tlsmgr.ALPNIstio},
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return src.Certificate()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	states := make(chan tls.ConnectionState, 16)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				tc := conn.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				states <- tc.ConnectionState()
				echo(tc)
			}()
		}
	}()
	return ln.Addr().String(), states
}

func TestKeyExchangeFlagPicksTheCurve(t *testing.T) {
	m := newMesh(t)
	for _, tt := range []struct {
		kx   mesh.KeyExchange
		want tls.CurveID
	}{
		{mesh.KeyExchangeHybridPQ, tls.X25519MLKEM768},
		{mesh.KeyExchangeX25519, tls.X25519},
	} {
		t.Run(string(tt.kx), func(t *testing.T) {
			addr, states := istioOnlyServer(t, m.identity(t, echoID))
			cst, _ := policyStore(t, "")
			client := startProxy(t, m.identity(t, webID), cst,
				WithOutboundExplicit("127.0.0.1:0", addr, mustID(t, echoID)), WithKeyExchange(tt.kx))
			if err := roundTrip(dial(t, client.Addrs()[0].String()), "ping\n"); err != nil {
				t.Fatal(err)
			}
			if got := (<-states).CurveID; got != tt.want {
				t.Errorf("key exchange %s negotiated %s, want %s", tt.kx, got, tt.want)
			}
		})
	}
	if _, err := mesh.ParseKeyExchange("rsa"); err == nil {
		t.Error("ParseKeyExchange accepted rsa")
	}
}

// App connections that arrive together before any pooled connection exists
// wait for the first one's handshake and ride its pooled connection.
func TestHBONEAutoColdBurstSharesOneHandshake(t *testing.T) {
	m := newMesh(t)
	c := autoChain(t, m, echo, "", HBONEAuto)
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	const burst = 12
	conns := make([]net.Conn, burst)
	for i := range conns {
		conns[i] = dial(t, c.entry)
	}
	var wg sync.WaitGroup
	for i, conn := range conns {
		wg.Go(func() {
			if err := roundTrip(conn, fmt.Sprintf("burst %d\n", i)); err != nil {
				t.Errorf("connection %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 1 {
		t.Errorf("%d handshakes for a burst of %d app connections, want 1", int(d), burst)
	}
}

// After our SVID rotates, new app connections ride a pooled connection
// handshaken with the new certificate; streams on the old one go on.
func TestHBONEAutoRotationMovesNewStreamsToAFreshConnection(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	st, _ := policyStore(t, "")
	server := startProxy(t, m.identity(t, echoID), st,
		WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONEMode(HBONEAuto))
	dest := server.Addrs()[0].String()
	cst, _ := policyStore(t, "")
	src := m.identity(t, webID)
	client := startProxy(t, src, cst, WithOutboundExplicit("127.0.0.1:0", dest, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	entry := client.Addrs()[0].String()
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	old := dial(t, entry)
	if err := roundTrip(old, "before\n"); err != nil {
		t.Fatal(err)
	}
	src.Set(m.ca.Issue(t, webID, time.Hour), m.ca.Bundle())
	if err := roundTrip(dial(t, entry), "after\n"); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != 2 {
		t.Errorf("%d handshakes, want 2: one before the rotation, one after", int(d))
	}
	if err := roundTrip(old, "still\n"); err != nil {
		t.Errorf("stream on the connection made before the rotation: %v", err)
	}
}
