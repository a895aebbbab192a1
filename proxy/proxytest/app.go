package proxytest

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	fwd "github.com/meshproxy/meshproxy/proxy/forward"
)

// App is a TCP server on 127.0.0.1 that runs a handler on every accepted
// connection. It stops at test cleanup: the listener and every open
// connection are closed and every handler has returned.
type App struct {
	ln       net.Listener
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	accepted int
	wg       sync.WaitGroup
}

// StartApp starts an App running handle on each connection, which is
// closed when handle returns and, at the latest, after deadline.
func StartApp(t testing.TB, deadline time.Duration, handle func(net.Conn)) *App {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := &App{ln: ln, conns: make(map[net.Conn]struct{})}
	a.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.mu.Lock()
			a.conns[c] = struct{}{}
			a.accepted++
			a.mu.Unlock()
			a.wg.Go(func() {
				defer func() {
					c.Close()
					a.mu.Lock()
					delete(a.conns, c)
					a.mu.Unlock()
				}()
				_ = c.SetDeadline(time.Now().Add(deadline))
				handle(c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		a.mu.Lock()
		for c := range a.conns {
			c.Close()
		}
		a.mu.Unlock()
		a.wg.Wait()
	})
	return a
}

// Addr is the app's address, host:port.
func (a *App) Addr() string { return a.ln.Addr().String() }

// Port is the app's port.
func (a *App) Port() uint16 { return uint16(a.ln.Addr().(*net.TCPAddr).Port) }

// Accepted is the number of connections accepted so far.
func (a *App) Accepted() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.accepted
}

// Echo copies everything back, then half-closes and waits for the peer to
// close.
func Echo(c net.Conn) {
	_, _ = io.Copy(c, c)
	_ = fwd.CloseWrite(c)
	_, _ = io.Copy(io.Discard, c)
}

// Dial connects to addr with a deadline of within covering the whole
// exchange; the connection is closed at test cleanup.
func Dial(t testing.TB, addr string, within time.Duration) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, within)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(within))
	t.Cleanup(func() { c.Close() })
	return c
}
