package rawsock

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"go.uber.org/goleak"
)

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func randomSize(t *testing.T, max int64) int {
	t.Helper()
	n, err := rand.Int(rand.Reader, big.NewInt(max))
	if err != nil {
		t.Fatal(err)
	}
	return int(n.Int64()) + 1
}

func mustWrap(t *testing.T, c net.Conn) *Conn {
	t.Helper()
	k, ok := Wrap(c).(*Conn)
	if !ok {
		t.Fatalf("Wrap(%T) did not wrap a plain socket", c)
	}
	return k
}

// TestBytesExactBothWays: 8 MiB written in one Write (more than the socket
// buffers hold, so it waits for room) arrives exact through Reads of random
// sizes from a reader that pauses, and the peer's end of stream is io.EOF.
func TestBytesExactBothWays(t *testing.T) {
	a, b := loopback.TCPPair(t)
	w, r := mustWrap(t, a), mustWrap(t, b)
	data := randomBytes(t, 8<<20)
	wrote := make(chan error, 1)
	go func() {
		n, err := w.Write(data)
		if err == nil && n != len(data) {
			err = io.ErrShortWrite
		}
		if err == nil {
			err = a.CloseWrite()
		}
		wrote <- err
	}()
	var got bytes.Buffer
	buf := make([]byte, 64<<10)
	for i := 0; ; i++ {
		if i%64 == 0 {
			time.Sleep(time.Millisecond) // let the writer find the socket full
		}
		n, err := r.Read(buf[:randomSize(t, int64(len(buf)))])
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got.Len(), err)
		}
	}
	if err := <-wrote; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("read %d bytes, not the %d written", got.Len(), len(data))
	}
}

// TestWritesDoNotInterleave: Writes from several goroutines each arrive
// whole, as with net.Conn.
func TestWritesDoNotInterleave(t *testing.T) {
	a, b := loopback.TCPPair(t)
	w := mustWrap(t, a)
	const writers, records, size = 4, 200, 48 << 10
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := bytes.Repeat([]byte{byte('a' + i)}, size)
			for range records {
				if _, err := w.Write(rec); err != nil {
					t.Errorf("write: %v", err)
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); a.CloseWrite() }()
	rec := make([]byte, size)
	for n := 0; ; n++ {
		if _, err := io.ReadFull(b, rec); err == io.EOF {
			if n != writers*records {
				t.Fatalf("%d records, want %d", n, writers*records)
			}
			return
		} else if err != nil {
			t.Fatalf("record %d: %v", n, err)
		}
		if bytes.Count(rec, rec[:1]) != size {
			t.Fatalf("record %d mixes two writers' bytes", n)
		}
	}
}

// TestErrorsAsNetConn: a deadline, a reset and a closed socket fail Read and
// Write with the errors net.Conn gives, so callers' checks still work.
func TestErrorsAsNetConn(t *testing.T) {
	t.Run("deadline", func(t *testing.T) {
		a, _ := loopback.TCPPair(t)
		c := mustWrap(t, a)
		a.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		start := time.Now()
		_, err := c.Read(make([]byte, 10))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read past the deadline: %v", err)
		}
		if time.Since(start) < 20*time.Millisecond {
			t.Fatal("the read returned before its deadline")
		}
	})
	t.Run("reset", func(t *testing.T) {
		a, b := loopback.TCPPair(t)
		c := mustWrap(t, a)
		if _, err := a.Write([]byte("unread")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		b.SetLinger(0)
		b.Close() // unread data and linger 0: RST
		_, err := c.Read(make([]byte, 10))
		var oe *net.OpError
		if !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &oe) || oe.Op != "read" {
			t.Fatalf("read after the peer reset: %v (%T)", err, err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		a, _ := loopback.TCPPair(t)
		c := mustWrap(t, a)
		a.Close()
		if _, err := c.Read(make([]byte, 10)); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read of a closed socket: %v", err)
		}
		if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("write to a closed socket: %v", err)
		}
	})
	t.Run("close unblocks a read", func(t *testing.T) {
		a, _ := loopback.TCPPair(t)
		c := mustWrap(t, a)
		done := make(chan error, 1)
		go func() { _, err := c.Read(make([]byte, 10)); done <- err }()
		time.Sleep(20 * time.Millisecond)
		a.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("read interrupted by Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Close did not end a waiting read")
		}
	})
}

// TestOnlyPlainSockets: anything but a TCP or Unix socket is returned as is.
func TestOnlyPlainSockets(t *testing.T) {
	p, q := net.Pipe()
	defer p.Close()
	defer q.Close()
	if got := Wrap(p); got != io.ReadWriter(p) {
		t.Fatalf("Wrap(net.Pipe) = %T, want the pipe itself", got)
	}
}

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// countingConn counts the Reads that reach the socket's own Read.
type countingConn struct {
	*net.TCPConn
	reads int
}

func (c *countingConn) Read(p []byte) (int, error) {
	c.reads++
	return c.TCPConn.Read(p)
}

// TestBulkReadsGoThroughNetConn: a reader that always finds data queued
// (and never fills its buffer) makes one of net.Conn's reads after every
// bulkStreak bytes — Go's system calls wake the runtime's monitor, which
// preempts a goroutine that runs on; without them one processor served
// nothing else while a download lasted — and a reader that waits for each
// message reads raw however much it reads. The bytes arrive exact.
func TestBulkReadsGoThroughNetConn(t *testing.T) {
	a, b := loopback.TCPPair(t)
	w, r := mustWrap(t, a), mustWrap(t, b)
	cc := &countingConn{TCPConn: b}
	r.nc = cc

	const chunk, total = 16 << 10, 4 << 20
	data := randomBytes(t, total)
	buf := make([]byte, 1<<20)
	var got bytes.Buffer
	for off := 0; off < total; off += chunk {
		// On loopback the chunk is queued when Write returns: the Read
		// finds it without waiting.
		if _, err := w.Write(data[off : off+chunk]); err != nil {
			t.Fatal(err)
		}
		for got.Len() < off+chunk {
			n, err := r.Read(buf)
			if err != nil {
				t.Fatalf("read after %d bytes: %v", got.Len(), err)
			}
			got.Write(buf[:n])
		}
	}
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatal("bytes differ")
	}
	if want := total / (bulkStreak + chunk); cc.reads < want {
		t.Fatalf("%d reads of %d MiB read without waiting went through net.Conn, want at least %d (one per %d KiB)",
			cc.reads, total>>20, want, bulkStreak>>10)
	}

	// Each read waits for its chunk: raw all along, though it reads more
	// than bulkStreak in all.
	cc.reads = 0
	for i := 0; i < 2*bulkStreak/chunk; i++ {
		read := make(chan error, 1)
		go func() { // a buffer it never fills: the full-read rule stays out
			n := 0
			for n < chunk {
				m, err := r.Read(buf)
				if err != nil {
					read <- err
					return
				}
				n += m
			}
			read <- nil
		}()
		time.Sleep(2 * time.Millisecond) // the reader is waiting by now
		if _, err := w.Write(data[:chunk]); err != nil {
			t.Fatal(err)
		}
		if err := <-read; err != nil {
			t.Fatal(err)
		}
	}
	if cc.reads != 0 {
		t.Fatalf("%d reads that waited for their data went through net.Conn, want 0", cc.reads)
	}
}

// TestNoAllocations: a Read and a Write allocate nothing (the data path
// makes one of each per message).
func TestNoAllocations(t *testing.T) {
	a, b := loopback.TCPPair(t)
	w, r := mustWrap(t, a), mustWrap(t, b)
	msg, buf := make([]byte, 1024), make([]byte, 1024)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := w.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per Write and Read, want 0", allocs)
	}
}

// TestReadNow: ReadNow never waits — ErrWouldBlock (a temporary timeout,
// which crypto/tls passes on without failing the connection) from an empty
// socket, what it holds otherwise, io.EOF after the peer's close.
func TestReadNow(t *testing.T) {
	a, b := loopback.TCPPair(t)
	c := mustWrap(t, a)
	buf := make([]byte, 64<<10)
	n, err := c.ReadNow(buf)
	var ne net.Error
	if n != 0 || !errors.Is(err, ErrWouldBlock) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("ReadNow on an empty socket = %d, %v; want 0, ErrWouldBlock (a timeout)", n, err)
	}
	want := randomBytes(t, 1000)
	if _, err := b.Write(want); err != nil {
		t.Fatal(err)
	}
	var got []byte
	deadline := time.Now().Add(10 * time.Second) // loopback: queued when Write returns, but be patient
	for len(got) < len(want) {
		if time.Now().After(deadline) {
			t.Fatalf("ReadNow got %d of %d bytes in 10 s", len(got), len(want))
		}
		n, err := c.ReadNow(buf)
		if err != nil && !errors.Is(err, ErrWouldBlock) {
			t.Fatal(err)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("ReadNow read %d bytes, not the %d written", len(got), len(want))
	}
	b.Close()
	for {
		n, err := c.ReadNow(buf)
		if errors.Is(err, ErrWouldBlock) && time.Now().Before(deadline) {
			continue // the FIN is on its way
		}
		if n != 0 || err != io.EOF {
			t.Fatalf("ReadNow after the peer closed = %d, %v; want 0, EOF", n, err)
		}
		break
	}
}

// TestReadNowOfAnyReader: the package-level ReadNow reads through a
// reader's own ReadNow, and a reader without one (a wrapper that buffers,
// a TLS connection) never gets read: ErrWouldBlock, its bytes untouched.
func TestReadNowOfAnyReader(t *testing.T) {
	a, b := loopback.TCPPair(t)
	if _, err := b.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	c := mustWrap(t, a)
	var n int
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if n, err = ReadNow(c, buf); !errors.Is(err, ErrWouldBlock) {
			break
		}
	}
	if n != 1 || err != nil || buf[0] != 'x' {
		t.Fatalf("ReadNow through a Conn = %d %q, %v; want the byte written", n, buf[:n], err)
	}
	r := bytes.NewReader([]byte("kept"))
	if n, err := ReadNow(r, buf); n != 0 || !errors.Is(err, ErrWouldBlock) || r.Len() != 4 {
		t.Fatalf("ReadNow of a reader without ReadNow = %d, %v (%d bytes left); want 0, ErrWouldBlock, all 4 left", n, err, r.Len())
	}
}
