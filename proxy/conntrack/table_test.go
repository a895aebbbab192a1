package conntrack

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

const wait = 30 * time.Second // generous: the machine is shared

// pair returns both ends of a loopback TCP connection.
func pair(t *testing.T) (client, server net.Conn) {
	c, s := loopback.TCPPair(t)
	return c, s
}

func TestTableRefusesPastLimitAndAbortsOnDrainDeadline(t *testing.T) {
	tb := NewTable(slog.New(slog.DiscardHandler), 1)
	active := prometheus.NewGauge(prometheus.GaugeOpts{Name: "active"})
	client, first := pair(t)
	started := make(chan *Conn, 1)
	if err := tb.Admit(t.Context(), "inbound", first, active, func(c *Conn) {
		started <- c
		_, _ = io.Copy(io.Discard, first) // until aborted
	}); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	c := <-started
	c.Establish("10.0.0.1:80", "mtls", "spiffe://cluster.local/ns/a/sa/b")
	if peers := tb.Peers(); len(peers) != 1 || peers[0].Destination != "10.0.0.1:80" || peers[0].Direction != "inbound" {
		t.Fatalf("peers = %+v", peers)
	}
	if got := testutil.ToFloat64(active); got != 1 {
		t.Fatalf("active = %v, want 1", got)
	}

	_, second := pair(t)
	if err := tb.Admit(t.Context(), "inbound", second, active, func(*Conn) { t.Error("second connection handled past the limit") }); !errors.Is(err, ErrOverLimit) {
		t.Fatalf("second connection: %v, want ErrOverLimit", err)
	}

	tb.Close()
	if err := tb.Admit(t.Context(), "inbound", second, active, func(*Conn) { t.Error("connection handled while closing") }); !errors.Is(err, ErrClosing) {
		t.Fatalf("after Close: %v, want ErrClosing", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel() // deadline already passed: the open connection is aborted
	if err := tb.Drain(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("drain = %v, want the context's error", err)
	}
	if tb.Len() != 0 || testutil.ToFloat64(active) != 0 {
		t.Fatalf("after drain: %d open, active %v", tb.Len(), testutil.ToFloat64(active))
	}
	_ = client.SetReadDeadline(time.Now().Add(wait))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client still connected after the drain deadline")
	}
}

func TestServeHandsAcceptedConnectionsUntilListenerCloses(t *testing.T) {
	tb := NewTable(slog.New(slog.DiscardHandler), 0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	tb.Serve(ln, func(c net.Conn) { accepted <- c }, "listener", "test")
	c, err := net.DialTimeout("tcp", ln.Addr().String(), wait)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	select {
	case s := <-accepted:
		s.Close()
	case <-time.After(wait):
		t.Fatal("connection not handed over")
	}
	ln.Close()
	if err := tb.Drain(t.Context()); err != nil {
		t.Fatalf("drain with no connections: %v", err)
	}
}
