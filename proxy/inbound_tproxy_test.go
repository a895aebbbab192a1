package proxy

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// podClient is where a TPROXY'd connection seems to come from in these
// tests: another pod's address.
var podClient = netip.MustParseAddr("192.0.2.7")

// fromPod is a loopback listener whose connections report podClient as
// their peer, as connections accepted behind TPROXY report the real client.
type fromPod struct{ net.Listener }

func (l fromPod) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	port := c.RemoteAddr().(*net.TCPAddr).Port
	return podConn{Conn: c, remote: &net.TCPAddr{IP: podClient.AsSlice(), Port: port}}, nil
}

type podConn struct {
	net.Conn
	remote net.Addr
}

func (c podConn) RemoteAddr() net.Addr { return c.remote }

// dialRecorder is an InboundDialFunc that records its calls and then dials
// normally (on loopback the app can only be reached from loopback).
type dialRecorder struct {
	mu    sync.Mutex
	calls []string // "client -> addr"
	err   error
}

func (d *dialRecorder) dial(ctx context.Context, client netip.AddrPort, network, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.calls = append(d.calls, client.String()+" -> "+addr)
	err := d.err
	d.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, addr)
}

func (d *dialRecorder) recorded() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.calls...)
}

// TestTransparentInboundUsesInboundListenAndDialer: the transparent inbound
// listener is bound by WithInboundListen, and its connections reach the app
// through WithInboundDialer on behalf of the real client; explicit
// listeners use neither.
func TestTransparentInboundUsesInboundListenAndDialer(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	a := startApp(t, echo)
	var listened []string
	var mu sync.Mutex
	listen := func(ctx context.Context, network, addr string) (net.Listener, error) {
		mu.Lock()
		listened = append(listened, network+" "+addr)
		mu.Unlock()
		var lc net.ListenConfig
		ln, err := lc.Listen(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return fromPod{ln}, nil
	}
	rec := &dialRecorder{}
	p := startProxy(t, m.identity(t, echoID), st,
		WithInboundTransparent("127.0.0.1:0"), WithOriginalDst(fixedDst(a.addr())),
		WithInboundExplicit("127.0.0.1:0", a.addr()),
		WithInboundListen(listen), WithInboundDialer(rec.dial))

	mu.Lock()
	if len(listened) != 1 || listened[0] != "tcp 127.0.0.1:0" {
		t.Errorf("WithInboundListen was called for %q, want only the transparent inbound listener", listened)
	}
	mu.Unlock()

	if err := plaintextClient(t, p.Addrs()[0].String()); err != nil {
		t.Fatalf("through the transparent inbound listener: %v", err)
	}
	calls := rec.recorded()
	if len(calls) != 1 || !strings.HasPrefix(calls[0], podClient.String()+":") || !strings.HasSuffix(calls[0], " -> "+a.addr()) {
		t.Fatalf("inbound dialer calls %q, want one from %s to %s", calls, podClient, a.addr())
	}
	if err := plaintextClient(t, p.Addrs()[1].String()); err != nil {
		t.Fatalf("through the explicit inbound listener: %v", err)
	}
	if n := len(rec.recorded()); n != 1 {
		t.Errorf("the explicit inbound listener used the inbound dialer (%d calls)", n)
	}
}

// TestInboundDialerFailureRefusesTheConnection: when the app cannot be
// reached from the client's address the connection is refused as
// upstream_unreachable, with the client's address in the log line.
func TestInboundDialerFailureRefusesTheConnection(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	a := startApp(t, echo)
	rec := &dialRecorder{err: errors.New("set IP_TRANSPARENT: operation not permitted")}
	var logs tproxyLogBuffer
	listen := func(ctx context.Context, network, addr string) (net.Listener, error) {
		ln, err := net.Listen(network, addr)
		return fromPod{ln}, err
	}
	p := startProxy(t, m.identity(t, echoID), st,
		WithInboundTransparent("127.0.0.1:0"), WithOriginalDst(fixedDst(a.addr())),
		WithInboundListen(listen), WithInboundDialer(rec.dial),
		WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	before := connections(mesh.DirInbound, mesh.ModePlaintext, DecisionUnreachable)
	if err := plaintextClient(t, p.Addrs()[0].String()); err == nil {
		t.Fatal("forwarded although the inbound dialer failed")
	}
	eventually(t, "refusal counted", func() bool {
		return connections(mesh.DirInbound, mesh.ModePlaintext, DecisionUnreachable) == before+1
	})
	if out := logs.String(); !strings.Contains(out, "from "+podClient.String()) || !strings.Contains(out, "IP_TRANSPARENT") {
		t.Errorf("refusal log does not name the client address and the cause:\n%s", out)
	}
}

// TestInboundDialerFallsBackForLoopbackClients: a client on loopback cannot
// be impersonated usefully (replies to it never leave the pod), so the app
// is dialed from the proxy's own address, and that is logged once.
func TestInboundDialerFallsBackForLoopbackClients(t *testing.T) {
	m := newMesh(t)
	st, _ := policyStore(t, "")
	a := startApp(t, echo)
	rec := &dialRecorder{}
	var logs tproxyLogBuffer
	p := startProxy(t, m.identity(t, echoID), st,
		WithInboundTransparent("127.0.0.1:0"), WithOriginalDst(fixedDst(a.addr())),
		WithInboundDialer(rec.dial), WithLogger(slog.New(slog.NewTextHandler(&logs, nil))))
	for range 2 {
		if err := plaintextClient(t, p.Addrs()[0].String()); err != nil {
			t.Fatalf("loopback client: %v", err)
		}
	}
	if calls := rec.recorded(); len(calls) != 0 {
		t.Errorf("inbound dialer used for a loopback client: %q", calls)
	}
	if n := strings.Count(logs.String(), "client address is loopback or unknown"); n != 1 {
		t.Errorf("fallback logged %d times, want once:\n%s", n, logs.String())
	}
}

// tproxyLogBuffer is a log destination written from connection goroutines.
type tproxyLogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *tproxyLogBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *tproxyLogBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
