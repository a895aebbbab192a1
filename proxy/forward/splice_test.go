package forward

import (
	"bytes"
	"crypto/rand"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// wrapped hides the *net.TCPConn type, as any wrapper (TLS, a sniffer's
// replaying conn) does: the forwarder must copy through its buffers.
type wrapped struct{ net.Conn }

func (w wrapped) CloseWrite() error { return w.Conn.(*net.TCPConn).CloseWrite() }

// runWith forwards between fresh loopback pairs, the proxy's ends passed
// through wrap.
func runWith(t *testing.T, wrap func(net.Conn) net.Conn) (client, server net.Conn, stats *Stats, done <-chan error) {
	t.Helper()
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	stats = &Stats{}
	var once sync.Once
	abort := func() { once.Do(func() { down.Close(); up.Close() }) }
	ch := make(chan error, 1)
	go func() {
		ch <- Forward(wrap(down), wrap(up), stats, time.Hour, abort, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
	}()
	return client, server, stats, ch
}

// transfer sends payload from one end and checks it arrives unchanged at
// the other, then half-closes and waits for Forward.
func transfer(t *testing.T, client, server net.Conn, done <-chan error, payload []byte) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := client.Write(payload)
		if err == nil {
			err = client.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(server)
	if err != nil {
		t.Fatalf("server read: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("client write: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("server got %d bytes, not the %d sent", len(got), len(payload))
	}
	server.Close()
	if _, err := io.ReadAll(client); err != nil {
		t.Fatalf("client read: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Forward: %v", err)
		}
	case <-time.After(wait):
		t.Fatal("Forward did not return")
	}
}

// TestPassthroughBetweenTCPSocketsSplices: between two plain TCP sockets
// (passthrough, DISABLE) bulk data goes through (*net.TCPConn).ReadFrom,
// i.e. splice(2), and arrives intact and counted.
func TestPassthroughBetweenTCPSocketsSplices(t *testing.T) {
	payload := make([]byte, 8<<20)
	rand.Read(payload)
	client, server, stats, done := run(t, time.Hour)
	transfer(t, client, server, done, payload)
	if got := stats.In.Load(); got != int64(len(payload)) {
		t.Errorf("stats.In = %d, want %d", got, len(payload))
	}
	if stats.spliced.Load() < int64(len(payload))/2 {
		t.Errorf("only %d of %d bytes were spliced: the TCP-to-TCP path does not use ReadFrom", stats.spliced.Load(), len(payload))
	}
}

// TestWrappedConnsCopyThroughBuffers: anything but two *net.TCPConn (TLS,
// a sniffed conn) is copied in user space, intact, through buffers that
// grow and shrink with the flow.
func TestWrappedConnsCopyThroughBuffers(t *testing.T) {
	payload := make([]byte, 8<<20)
	rand.Read(payload)
	client, server, stats, done := runWith(t, func(c net.Conn) net.Conn { return wrapped{c} })
	transfer(t, client, server, done, payload)
	if got := stats.In.Load(); got != int64(len(payload)) {
		t.Errorf("stats.In = %d, want %d", got, len(payload))
	}
	if n := stats.spliced.Load(); n != 0 {
		t.Errorf("%d bytes spliced between wrapped conns", n)
	}
}

// TestSplicedBytesAreCountedWhenTheFlowPauses: a burst that ends short of
// a splice chunk is still counted (and seen by the idle watch) while the
// connection stays open.
func TestSplicedBytesAreCountedWhenTheFlowPauses(t *testing.T) {
	client, server, stats, _ := run(t, time.Hour)
	burst := make([]byte, 256<<10) // fills the small buffer: a splice burst starts
	if _, err := client.Write(burst); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(server, make([]byte, len(burst))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(wait)
	for stats.In.Load() != int64(len(burst)) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := stats.In.Load(); got != int64(len(burst)) {
		t.Fatalf("stats.In = %d after the burst, want %d", got, len(burst))
	}
	// After the pause the connection still works both ways.
	if _, err := io.WriteString(client, "ping"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(server, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("server read %q, %v", buf, err)
	}
	if _, err := io.WriteString(server, "pong"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q, %v", buf, err)
	}
}

// BenchmarkForward measures one direction of the forwarder: spliced (TCP
// to TCP) and through buffers (wrapped conns, as TLS is). Allocations per
// op should stay 0 in the steady state.
func BenchmarkForward(b *testing.B) {
	for _, bc := range []struct {
		name string
		wrap func(net.Conn) net.Conn
	}{
		{"splice", func(c net.Conn) net.Conn { return c }},
		{"buffered", func(c net.Conn) net.Conn { return wrapped{c} }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			client, down := tcpPair(b)
			up, sink := tcpPair(b)
			for _, c := range []net.Conn{client, down, up, sink} {
				_ = c.SetDeadline(time.Time{})
			}
			stats := &Stats{}
			abort := func() { down.Close(); up.Close() }
			done := make(chan error, 1)
			go func() {
				done <- Forward(bc.wrap(down), bc.wrap(up), stats, time.Hour, abort, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
			}()
			drained := make(chan int64, 1)
			go func() {
				n, _ := io.Copy(io.Discard, sink)
				drained <- n
			}()
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := client.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			_ = client.(*net.TCPConn).CloseWrite()
			if n := <-drained; n != int64(b.N)*int64(len(chunk)) {
				b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
			}
			b.StopTimer()
			sink.Close()
			client.Close()
			<-done
		})
	}
}
