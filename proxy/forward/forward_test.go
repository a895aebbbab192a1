package forward

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
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

// recordConn stands in for a TLS source: Read returns at most a record
// (burstEnd bytes), ReadMore what its socket holds without waiting.
type recordConn struct {
	*net.TCPConn
	now   atomic.Int64 // bytes ReadMore returned
	calls atomic.Int64 // ReadMore calls
}

func (c *recordConn) Read(p []byte) (int, error) { return c.TCPConn.Read(p[:min(len(p), burstEnd)]) }

func (c *recordConn) ReadMore(p []byte) (int, error) {
	c.calls.Add(1)
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool { // one attempt: only what is there
		n, rerr = syscall.Read(int(fd), p[:min(len(p), burstEnd)])
		return true
	}); err != nil {
		return 0, err
	}
	switch {
	case errors.Is(rerr, syscall.EAGAIN):
		return 0, nil
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	c.now.Add(int64(n))
	return n, nil
}

// writeSizes is a destination recording the size of every Write.
type writeSizes struct {
	net.Conn
	mu    sync.Mutex
	sizes []int
}

func (w *writeSizes) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.sizes = append(w.sizes, len(p))
	w.mu.Unlock()
	return w.Conn.Write(p)
}

func (w *writeSizes) CloseWrite() error { return w.Conn.(*net.TCPConn).CloseWrite() }

// TestRecordsThatCameTogetherGoInOneWrite: from a source whose Read
// returns one record at a time, the copy loop gathers what the source has
// without waiting (ReadMore) into the same write while data flows: writes
// larger than a record, every byte once and in order; after short messages
// it does not look (that would cost a system call each).
func TestRecordsThatCameTogetherGoInOneWrite(t *testing.T) {
	client, down := tcpPair(t)
	up, server := tcpPair(t)
	src := &recordConn{TCPConn: down.(*net.TCPConn)}
	dst := &writeSizes{Conn: up}
	var once sync.Once
	abort := func() { once.Do(func() { down.Close(); up.Close() }) }
	done := make(chan error, 1)
	go func() {
		done <- Forward(src, dst, &Stats{}, time.Hour, abort, prometheus.NewCounter(prometheus.CounterOpts{Name: "x"}))
	}()
	// Short messages, each read alone: nothing is looked for after them.
	for i := range 10 {
		msg := []byte(fmt.Sprintf("message %d\n", i))
		if _, err := client.Write(msg); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(server, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("server read %q, %v; want %q", got, err, msg)
		}
	}
	if n := src.calls.Load(); n != 0 {
		t.Errorf("ReadMore called %d times after short messages, want none (a system call each)", n)
	}

	want := make([]byte, 4<<20)
	for i := range want {
		want[i] = byte(i * 5 / 3)
	}
	go func() {
		_, _ = client.Write(want)
		_ = client.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("server read %d bytes (%v), want the %d sent, in order", len(got), err, len(want))
	}
	server.Close()
	client.Close()
	<-done
	dst.mu.Lock()
	largest := slices.Max(dst.sizes)
	dst.mu.Unlock()
	if src.now.Load() == 0 || largest <= burstEnd {
		t.Errorf("ReadMore gathered %d bytes, largest write %d: want records gathered into writes larger than one", src.now.Load(), largest)
	}
}
