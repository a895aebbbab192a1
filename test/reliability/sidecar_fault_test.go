package reliability

import (
	"bufio"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestAppDownClosesClientPromptlyAndCounts(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	deadApp := e2eutil.FreeAddr(t) // nothing listens here
	p := startPair(t, deadApp, func(id string) []string { return e2eutil.FileIdentity(t, pki, id) })

	unreachable := func(s e2eutil.Sidecar, dir string) float64 {
		// Any mode: pooled (hbone) by default between meshproxy sidecars.
		v, err := s.Metric("meshproxy_connections_total", "direction", dir, "decision", "upstream_unreachable")
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	before := unreachable(p.server, "inbound")
	c, err := net.DialTimeout("tcp", p.entry, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte("anyone there?\n"))
	// Closed by the sidecars as soon as the dial is refused, not by our deadline.
	if err := closedByPeer(c, wait); err != nil {
		t.Fatalf("client connection with the app down: %v", err)
	}
	e2eutil.Eventually(t, "upstream_unreachable counted on the server sidecar", wait, func() error {
		if got := unreachable(p.server, "inbound") - before; got != 1 {
			return fmt.Errorf("inbound upstream_unreachable rose by %v, want 1", got)
		}
		return nil
	})

	// The server sidecar down: the client sidecar refuses the same way.
	p.serverProc.Kill(t)
	before = unreachable(p.client, "outbound")
	c2, err := net.DialTimeout("tcp", p.entry, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := closedByPeer(c2, wait); err != nil {
		t.Fatalf("client connection with the peer sidecar down: %v", err)
	}
	e2eutil.Eventually(t, "upstream_unreachable counted on the client sidecar", wait, func() error {
		if got := unreachable(p.client, "outbound") - before; got != 1 {
			return fmt.Errorf("outbound upstream_unreachable rose by %v, want 1", got)
		}
		return nil
	})
}

func TestPeerKilledMidTransferLeaksNothing(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	p := startPair(t, e2eutil.EchoApp(t), func(id string) []string { return e2eutil.FileIdentity(t, pki, id) })
	// Warm up pools and lazily started goroutines, then take the baseline.
	for i := range 20 {
		if err := exchange(p.entry, fmt.Sprintf("warm-up %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	base := backToBaseline(t, "client sidecar before", p.client, p.clientProc, sample(t, p.client, p.clientProc))

	// Transfers in flight: each client keeps echoing lines through the pair.
	const transfers = 8
	type stream struct {
		c net.Conn
		r *bufio.Reader
	}
	streams := make([]stream, transfers)
	for i := range streams {
		c, err := net.DialTimeout("tcp", p.entry, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(wait))
		streams[i] = stream{c, bufio.NewReader(c)}
		if err := echoLine(c, streams[i].r, fmt.Sprintf("stream %d", i)); err != nil {
			t.Fatal(err)
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // keep bytes moving on every stream until the kill
		defer close(done)
		payload := make([]byte, 32<<10)
		for {
			for _, s := range streams {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.c.Write(payload); err != nil {
					return
				}
			}
		}
	}()
	e2eutil.Eventually(t, "transfers in flight through the server sidecar", wait, func() error {
		v, err := p.server.Metric("meshproxy_connections_active", "direction", "inbound")
		if err != nil || v < transfers {
			return fmt.Errorf("inbound connections_active %v, %v", v, err)
		}
		return nil
	})

	p.serverProc.Kill(t)
	// The survivor closes every client connection promptly.
	for i, s := range streams {
		if err := closedByPeer(s.c, wait); err != nil {
			t.Errorf("stream %d after the peer was killed: %v", i, err)
		}
	}
	close(stop)
	<-done
	for _, s := range streams {
		s.c.Close()
	}
	after := backToBaseline(t, "client sidecar after the kill", p.client, p.clientProc, base)
	t.Logf("client sidecar: goroutines %d → %d, descriptors %d → %d", base.goroutines, after.goroutines, base.fds, after.fds)
	if err := p.client.Ready(); err != nil {
		t.Errorf("surviving sidecar unready: %v", err)
	}
}
