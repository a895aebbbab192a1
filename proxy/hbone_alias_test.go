package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// service is a stand-in for a Kubernetes Service: a listener (the "VIP")
// that hands each TCP connection to the next of its endpoints in turn, as
// kube-proxy's DNAT does, copying bytes both ways.
type service struct {
	ln        net.Listener
	endpoints []string
	next      atomic.Uint64
	wg        sync.WaitGroup
}

func startService(t *testing.T, endpoints ...string) *service {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &service{ln: ln, endpoints: endpoints}
	s.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			to := s.endpoints[(s.next.Add(1)-1)%uint64(len(s.endpoints))]
			s.wg.Go(func() { splice(c, to) })
		}
	})
	t.Cleanup(func() { ln.Close(); s.wg.Wait() })
	return s
}

func (s *service) addr() string { return s.ln.Addr().String() }

// splice connects c to addr and copies both ways until both directions end.
func splice(c net.Conn, addr string) {
	defer c.Close()
	up, err := net.DialTimeout("tcp", addr, clientWait)
	if err != nil {
		return
	}
	defer up.Close()
	var wg sync.WaitGroup
	for _, d := range [][2]net.Conn{{up, c}, {c, up}} {
		wg.Go(func() {
			_, _ = io.Copy(d[0], d[1])
			_ = d[0].(*net.TCPConn).CloseWrite()
		})
	}
	wg.Wait()
}

// namedApp answers each connection with its name and the line it read.
func namedApp(name string) func(net.Conn) {
	return func(c net.Conn) {
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		_, _ = fmt.Fprintf(c, "%s %s", name, buf[:n])
	}
}

// A Service VIP in front of two meshproxy endpoints: the client pools by
// the VIP, each endpoint carries the streams naming the VIP to its app (the
// alias of stream 1), and pooled connections are bounded so app
// connections reach both endpoints over time.
func TestHBONEAutoPoolsThroughAServiceVIP(t *testing.T) {
	m := newMesh(t)
	var eps []string
	for _, name := range []string{"ep1", "ep2"} {
		a := startApp(t, namedApp(name))
		st, _ := policyStore(t, peerAuth("STRICT"))
		server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONEMode(HBONEAuto))
		eps = append(eps, server.Addrs()[0].String())
	}
	vip := startService(t, eps...)
	cst, _ := policyStore(t, "")
	const bound = 5
	client := startProxy(t, m.identity(t, webID), cst, WithOutboundExplicit("127.0.0.1:0", vip.addr(), mustID(t, echoID)),
		WithHBONEMode(HBONEAuto), func(o *options) { o.hbone.maxPoolStreams = bound })
	entry := client.Addrs()[0].String()
	out := handshakes(mesh.DirOutbound, mesh.ResultOK)
	pooledOut := pooled(mesh.DirOutbound)
	viaHBONE := connections(mesh.DirOutbound, ModeHBONE, DecisionAllow)
	viaDirect := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow)

	var mu sync.Mutex
	served := map[string]int{}
	exchange := func(i int) error {
		c := dial(t, entry)
		defer c.Close() // the app connection ends: its stream is released
		msg := fmt.Sprintf("hello-%d", i)
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		got, err := io.ReadAll(c)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		var name, echoed string
		if _, err := fmt.Sscan(string(got), &name, &echoed); err != nil || echoed != msg {
			return fmt.Errorf("connection %d: answer %q", i, got)
		}
		mu.Lock()
		served[name]++
		mu.Unlock()
		return nil
	}
	const n = 4 * bound
	for i := range n {
		if err := exchange(i); err != nil {
			t.Fatal(err)
		}
	}
	if served["ep1"] == 0 || served["ep2"] == 0 || served["ep1"]+served["ep2"] != n {
		t.Errorf("served %v: want both endpoints, %d in all", served, n)
	}
	if d := connections(mesh.DirOutbound, ModeHBONE, DecisionAllow) - viaHBONE; d != n {
		t.Errorf("%v app connections pooled, want all %d", d, n)
	}
	if d := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow) - viaDirect; d != 0 {
		t.Errorf("%v app connections went per-connection, want none", d)
	}
	if d := handshakes(mesh.DirOutbound, mesh.ResultOK) - out; d != n/bound {
		t.Errorf("%v handshakes for %d app connections, want one per %d streams (%d)", d, n, bound, n/bound)
	}

	// Concurrent app connections across many bounds: streams ride a
	// retired connection while its successor is dialed, none is lost.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Go(func() {
			for i := range 10 {
				if err := exchange(n + w*10 + i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if d := connections(mesh.DirOutbound, ModeHBONE, DecisionAllow) - viaHBONE; d != n+80 {
		t.Errorf("%v app connections pooled, want all %d", d, n+80)
	}
	// Retired connections close once their streams are done: one is left.
	eventually(t, "retired pooled connections closed", func() bool { return pooled(mesh.DirOutbound)-pooledOut == 1 })
}

// negotiated opens a pooled connection to addr as a meshproxy client
// does: mesh mTLS offering the HBONE ALPN, HTTP/2 on top.
func negotiated(t *testing.T, src tlsmgr.Source, addr string) *hb.Conn {
	t.Helper()
	cfg := tlsmgr.ClientConfig(src, nil, hb.ALPN, tlsmgr.ALPNIstio)
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: clientWait}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), clientWait)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if p := c.(*tls.Conn).ConnectionState().NegotiatedProtocol; p != hb.ALPN {
		t.Fatalf("negotiated %q, want %q", p, hb.ALPN)
	}
	hc := hb.NewClient(c, hb.Options{})
	t.Cleanup(func() { hc.Close() })
	return hc
}

// connectStream opens a stream for authority and, if accepted, checks that
// it reaches the app.
func connectStream(t *testing.T, hc *hb.Conn, authority string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), clientWait)
	defer cancel()
	s, err := hc.Open(ctx, authority)
	if err != nil {
		t.Fatalf("CONNECT %s: %v", authority, err)
	}
	defer s.Close()
	if s.Status() == http.StatusOK {
		if err := roundTrip(s, "ping\n"); err != nil {
			t.Errorf("CONNECT %s: accepted, but %v", authority, err)
		}
	}
	return s.Status(), s.FailReason()
}

// The alias is stream 1's :authority on that connection only; any other
// authority is checked as before, and a refusal says why.
func TestHBONEAliasIsStreamOnesAuthorityOnThatConnectionOnly(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, echo)
	bystander := startApp(t, echo)
	st, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()), WithHBONEMode(HBONEAuto))
	addr := server.Addrs()[0].String()
	src := m.identity(t, webID)

	first := negotiated(t, src, addr)
	const vip = "10.96.0.10:80"
	for _, tt := range []struct {
		authority string
		status    int
		reason    string
	}{
		{vip, http.StatusOK, ""},                      // stream 1: the alias
		{vip, http.StatusOK, ""},                      // later streams naming it
		{"[::ffff:10.96.0.10]:80", http.StatusOK, ""}, // the same address, IPv4-mapped
		{"10.96.0.10:81", http.StatusForbidden, DecisionBadDestination},
		{"10.96.0.11:80", http.StatusForbidden, DecisionBadDestination},
		{bystander.addr(), http.StatusForbidden, DecisionBadDestination},
		{a.addr(), http.StatusOK, ""}, // the app by its address, as without alias
		{"app:80", http.StatusBadRequest, DecisionBadRequest},
	} {
		status, reason := connectStream(t, first, tt.authority)
		if status != tt.status || reason != tt.reason {
			t.Errorf("CONNECT %s on the first connection: %d %q, want %d %q", tt.authority, status, reason, tt.status, tt.reason)
		}
	}

	// Another connection whose stream 1 names something else: the first
	// connection's alias means nothing here.
	second := negotiated(t, src, addr)
	if status, _ := connectStream(t, second, a.addr()); status != http.StatusOK {
		t.Fatalf("stream 1 of the second connection: %d", status)
	}
	if status, reason := connectStream(t, second, vip); status != http.StatusForbidden || reason != DecisionBadDestination {
		t.Errorf("the first connection's alias on the second: %d %q, want 403 %s", status, reason, DecisionBadDestination)
	}
	if n := bystander.Accepted(); n != 0 {
		t.Errorf("the unconfigured service was reached %d times", n)
	}
}

// On :15006 the alias stands for the connection's original destination,
// which then passes the transparent rules: this pod's address on a port
// that is not the proxy's own.
func TestHBONEAliasOnTransparentInboundIsTheOriginalDestination(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	p := startProxy(t, m.identity(t, echoID), st, WithInboundTransparent("127.0.0.1:0"),
		WithOriginalDst(fixedDst("127.0.0.1:1")))
	pod := netip.MustParseAddr("10.0.0.5")
	pod6 := netip.MustParseAddr("fd00::5")
	tests := []struct {
		name    string
		reached string   // the connection's original destination
		streams []string // :authority of streams 1, 3, ...
		want    []string // where each goes; "" refused
	}{
		{"service port to target port", "10.0.0.5:8080", []string{"10.96.0.10:80", "10.96.0.10:80", "10.96.0.10:81", "10.0.0.5:9090", "10.0.0.6:8080"},
			[]string{"10.0.0.5:8080", "10.0.0.5:8080", "", "10.0.0.5:9090", ""}},
		{"IPv6", "[fd00::5]:8080", []string{"[fd00:96::10]:80", "[fd00:96::10]:80", "[fd00:96::11]:80"},
			[]string{"[fd00::5]:8080", "[fd00::5]:8080", ""}},
		{"the kernel's pick is still checked", "10.0.0.5:15020", []string{"10.96.0.10:80", "10.96.0.10:80"},
			[]string{"", ""}},
		{"malformed stream 1 makes no alias", "10.0.0.5:8080", []string{"svc:80", "svc:80", "10.96.0.10:80"},
			[]string{"", "", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			local := mesh.Unmap(netip.MustParseAddrPort(tt.reached)).Addr()
			if local != pod && local != pod6 {
				t.Fatalf("bad case: %s", tt.reached)
			}
			alias := &hboneAlias{to: tt.reached}
			for i, authority := range tt.streams {
				got, aliased := alias.resolve(streamFor(t, uint32(2*i+1), authority))
				dest, _, err := p.hboneTarget(got, local)
				if err != nil {
					dest = ""
				}
				if dest != tt.want[i] {
					t.Errorf("stream %d (%s, aliased %v): goes to %q (%v), want %q", 2*i+1, authority, aliased, dest, err, tt.want[i])
				}
			}
		})
	}
	// The HBONE listener makes no alias.
	none := &hboneAlias{}
	if got, aliased := none.resolve(streamFor(t, 1, "10.96.0.10:80")); aliased || got != "10.96.0.10:80" {
		t.Errorf("no alias: resolved to %s (aliased %v)", got, aliased)
	}
}

// streamFor is a server-side stream with id and authority, as the HBONE
// reader makes one, served by a real connection over loopback.
func streamFor(t *testing.T, id uint32, authority string) *hb.Stream {
	t.Helper()
	// The stream's id is the client's: open id/2 streams first.
	cs, ss := tcpPair(t)
	got := make(chan *hb.Stream, 8)
	server := hb.NewServer(ss, hb.Options{})
	go func() { _ = server.Serve(func(s *hb.Stream) { got <- s }) }()
	client := hb.NewClient(cs, hb.Options{})
	t.Cleanup(func() { client.Close(); server.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), clientWait)
	defer cancel()
	for range id / 2 {
		go func() { _, _ = client.Open(ctx, "0.0.0.0:1") }()
		s := <-got
		_ = s.Respond(http.StatusOK)
		if err := client.WaitSettings(ctx); err != nil {
			t.Fatal(err)
		}
	}
	go func() { _, _ = client.Open(ctx, authority) }()
	s := <-got
	t.Cleanup(func() { s.Close() })
	if s.ID() != id {
		t.Fatalf("stream id %d, want %d", s.ID(), id)
	}
	return s
}

// oldServer is a meshproxy server from before aliases, as seen by a
// client: it selects the HBONE ALPN and refuses every stream with a bare
// 403 (its inbound does not know the Service VIP the streams name), and
// echoes on per-connection mesh mTLS. It reports the ALPN protocols each
// client offered.
func oldServer(t *testing.T, src tlsmgr.Source) (string, <-chan []string) {
	return refusingServer(t, src, func(*hb.Stream) bool { return true })
}

// refusingServer is oldServer refusing the streams refuse picks, and
// echoing on the others.
func refusingServer(t *testing.T, src tlsmgr.Source, refuse func(*hb.Stream) bool) (string, <-chan []string) {
	t.Helper()
	offers := make(chan []string, 16)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{hb.ALPN, tlsmgr.ALPNIstio},
		ClientAuth: tls.RequireAnyClientCert,
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			offers <- slices.Clone(h.SupportedProtos)
			return nil, nil
		},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return src.Certificate() },
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				tc := conn.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				if tc.ConnectionState().NegotiatedProtocol != hb.ALPN {
					echo(tc)
					return
				}
				hc := hb.NewServer(tc, hb.Options{})
				_ = hc.Serve(func(s *hb.Stream) {
					defer s.Close()
					if refuse(s) {
						s.SetFailStatus(http.StatusForbidden)
						return
					}
					if s.Respond(http.StatusOK) == nil {
						echo(s)
					}
				})
			})
		}
	})
	return ln.Addr().String(), offers
}

// A server that refuses the destination of a pooled stream without saying
// why (a meshproxy from before aliases) costs nothing to the app: the app
// connection goes per-connection at once, and so do the next ones to the
// same destination, without offering HBONE.
func TestHBONEAutoFallsBackWhenThePeerRefusesPooledDestinations(t *testing.T) {
	m := newMesh(t)
	addr, offers := oldServer(t, m.identity(t, echoID))
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst, WithOutboundExplicit("127.0.0.1:0", addr, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	entry := client.Addrs()[0].String()
	viaDirect := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow)
	refused := connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused)

	for i := range 3 {
		if err := roundTrip(dial(t, entry), fmt.Sprintf("ping %d\n", i)); err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
	}
	if first := <-offers; !slices.Contains(first, hb.ALPN) {
		t.Errorf("first connection offered %v, want HBONE offered", first)
	}
	if len(offers) != 3 {
		t.Fatalf("%d handshakes after the first, want 3 (the fallback and two later connections)", len(offers))
	}
	for range 3 {
		if o := <-offers; slices.Contains(o, hb.ALPN) {
			t.Errorf("offered %v after the refusal, want no HBONE", o)
		}
	}
	if d := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow) - viaDirect; d != 3 {
		t.Errorf("%v per-connection app connections, want 3", d)
	}
	if d := connections(mesh.DirOutbound, ModeHBONE, DecisionPeerRefused) - refused; d != 0 {
		t.Errorf("%v app connections refused, want none", d)
	}
}

// A later stream of a pooled connection refused the same way (stream 1
// was served) also goes per-connection, and the pooled connection takes no
// new streams: the next app connections are per-connection too.
func TestHBONEAutoFallsBackWhenAPooledStreamIsRefused(t *testing.T) {
	m := newMesh(t)
	addr, offers := refusingServer(t, m.identity(t, echoID), func(s *hb.Stream) bool { return s.ID() > 1 })
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst, WithOutboundExplicit("127.0.0.1:0", addr, mustID(t, echoID)), WithHBONEMode(HBONEAuto))
	entry := client.Addrs()[0].String()
	viaHBONE := connections(mesh.DirOutbound, ModeHBONE, DecisionAllow)
	viaDirect := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow)
	pooledOut := pooled(mesh.DirOutbound)

	first := dial(t, entry)
	if err := roundTrip(first, "stream 1\n"); err != nil {
		t.Fatalf("stream 1: %v", err)
	}
	for i := range 2 {
		if err := roundTrip(dial(t, entry), fmt.Sprintf("then %d\n", i)); err != nil {
			t.Fatalf("connection %d after stream 1: %v", i, err)
		}
	}
	if d := connections(mesh.DirOutbound, ModeHBONE, DecisionAllow) - viaHBONE; d != 1 {
		t.Errorf("%v app connections pooled, want 1 (stream 1)", d)
	}
	if d := connections(mesh.DirOutbound, mesh.ModeMTLS, DecisionAllow) - viaDirect; d != 2 {
		t.Errorf("%v app connections per-connection, want 2", d)
	}
	if len(offers) != 3 {
		t.Fatalf("%d handshakes, want 3", len(offers))
	}
	if o := <-offers; !slices.Contains(o, hb.ALPN) {
		t.Errorf("first handshake offered %v, want HBONE", o)
	}
	for range 2 {
		if o := <-offers; slices.Contains(o, hb.ALPN) {
			t.Errorf("offered %v after the refusal, want no HBONE", o)
		}
	}
	// Stream 1 still flows on the retired connection, which then closes.
	if err := roundTrip(first, "still\n"); err != nil {
		t.Errorf("stream 1 after its connection was retired: %v", err)
	}
	first.Close()
	eventually(t, "the retired pooled connection closed", func() bool { return pooled(mesh.DirOutbound) == pooledOut })
}
