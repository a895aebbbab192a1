package forward

import (
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wait = 30 * time.Second

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	a, b := loopback.TCPPair(t)
	for _, c := range []net.Conn{a, b} {
		_ = c.SetDeadline(time.Now().Add(wait))
	}
	return a, b
}

// run forwards between a fresh client pair and server pair, returning the
// client end, the server end and Forward's result.
func run(t *testing.T, idle time.Duration) (client, server net.Conn, stats *Stats, done <-chan error) {
	t.Helper()
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	stats = &Stats{}
	var once sync.Once
	abort := func() { once.Do(func() { down.Close(); up.Close() }) }
	ch := make(chan error, 1)
	go func() {
		ch <- Forward(down, up, stats, idle, abort, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
	}()
	return client, server, stats, ch
}

func TestForwardPassesHalfCloseOnAndKeepsTheOtherWay(t *testing.T) {
	client, server, stats, done := run(t, time.Hour)
	if _, err := io.WriteString(client, "request"); err != nil {
		t.Fatal(err)
	}
	if err := client.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(server) // ends at the forwarded half-close
	if err != nil || string(got) != "request" {
		t.Fatalf("server read %q, %v", got, err)
	}
	// The other direction still flows after the client's half-close.
	if _, err := io.WriteString(server, "response"); err != nil {
		t.Fatal(err)
	}
	server.Close()
	got, err = io.ReadAll(client)
	if err != nil || string(got) != "response" {
		t.Fatalf("client read %q, %v", got, err)
	}
	if err := <-done; err != nil {
		t.Errorf("Forward: %v", err)
	}
	if stats.In.Load() != int64(len("request")) || stats.Out.Load() != int64(len("response")) {
		t.Errorf("stats in=%d out=%d", stats.In.Load(), stats.Out.Load())
	}
}

func TestForwardAbortsAnIdleConnection(t *testing.T) {
	client, _, _, done := run(t, 50*time.Millisecond)
	select {
	case err := <-done:
		if !errors.Is(err, ErrIdle) {
			t.Fatalf("Forward = %v, want ErrIdle", err)
		}
	case <-time.After(wait):
		t.Fatal("idle connection not aborted")
	}
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("client connection still open after the idle abort")
	}
}
