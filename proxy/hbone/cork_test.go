package hbone

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/proxy/proxytest"
	"golang.org/x/sys/unix"
)

func TestCorkSendsManyRecordsInOneWrite(t *testing.T) {
	cs, ss := tcpPair(t)
	counted := &proxytest.CountingConn{Conn: cs}
	cork := NewCorkConn(counted)
	client, server := proxytest.TLSPair(t, cork, ss)
	const size = 100 << 10 // seven records
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, 2*size)
		_, _ = io.ReadFull(server, b)
		got <- b
	}()
	payload := randomBytes(size)
	before := counted.Writes.Load()
	cork.Cork()
	if _, err := client.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := cork.Uncork(); err != nil {
		t.Fatal(err)
	}
	if n := counted.Writes.Load() - before; n != 1 {
		t.Errorf("corked: %d socket writes for %d bytes, want 1", n, size)
	}
	before = counted.Writes.Load()
	if _, err := client.Write(payload); err != nil {
		t.Fatal(err)
	}
	if n := counted.Writes.Load() - before; n < size/(16<<10) {
		t.Errorf("uncorked: %d socket writes, want one per record", n)
	}
	b := <-got
	if string(b[:size]) != string(payload) || string(b[size:]) != string(payload) {
		t.Fatal("bytes differ after corking")
	}
}

// A stream of bytes read through a CorkConn in record-sized reads comes
// out exact, reading ahead while reads come back full, and a connection
// that went quiet holds no read-ahead buffer.
func TestCorkReadAheadIsExactAndReleasedWhenQuiet(t *testing.T) {
	cs, ss := tcpPair(t)
	cork := NewCorkConn(ss)
	payload := randomBytes(4<<20 + 7)
	go func() { _, _ = cs.Write(payload) }()
	got := make([]byte, 0, len(payload))
	buf := make([]byte, 16<<10+5) // about what crypto/tls asks for
	readAhead := false
	for len(got) < len(payload) {
		n, err := cork.Read(buf)
		if err != nil {
			t.Fatalf("read after %d bytes: %v", len(got), err)
		}
		got = append(got, buf[:n]...)
		readAhead = readAhead || cork.rbuf != nil
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("bytes read through the CorkConn differ from those sent")
	}
	if !readAhead {
		t.Error("a 4 MiB stream was read without reading ahead")
	}
	if _, err := cs.Write([]byte("tail")); err != nil { // a short read ends the burst
		t.Fatal(err)
	}
	n, err := io.ReadAtLeast(cork, buf, 4)
	if err != nil || string(buf[:n]) != "tail" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	if cork.rbuf != nil {
		t.Error("a quiet connection still holds its read-ahead buffer")
	}
	cs.Close()
	if n, err := cork.Read(buf); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("after the peer closed: %d, %v; want EOF", n, err)
	}
}

// TestReadNowTakesOnlyWhatNeedsNoWait: after a Read returns one record,
// ReadNow returns the records that came with it and then 0 without
// waiting; a record only half arrived stays with crypto/tls (ReadNow
// returns 0, nil, the connection unharmed) and the next Read returns it
// whole once the rest arrives.
func TestReadNowTakesOnlyWhatNeedsNoWait(t *testing.T) {
	client, server, ccork, scork := corkedTLSPair(t)
	want := randomBytes(40 << 10) // three records
	if _, err := server.Write(want); err != nil {
		t.Fatal(err)
	}
	waitQueued(t, ccork.Conn, len(want)+3*22) // three records' headers and tags
	buf := make([]byte, 128<<10)
	n, err := client.Read(buf)
	if err != nil || n != maxFrame {
		t.Fatalf("Read = %d, %v; want one full record", n, err)
	}
	for {
		m, err := ccork.ReadNow(client, buf[n:])
		if err != nil {
			t.Fatal(err)
		}
		if m == 0 {
			break
		}
		n += m
	}
	if !bytes.Equal(buf[:n], want) {
		t.Fatalf("Read and ReadNow gathered %d bytes, want the %d written (in order)", n, len(want))
	}

	// Half a record: ReadNow gets nothing and does not wait.
	next := randomBytes(10 << 10)
	scork.Cork()
	if _, err := server.Write(next); err != nil {
		t.Fatal(err)
	}
	record := append([]byte(nil), scork.buf...)
	scork.buf = scork.buf[:0]
	if err := scork.Uncork(); err != nil {
		t.Fatal(err)
	}
	half := len(record) / 2
	if _, err := scork.Conn.Write(record[:half]); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if m, err := ccork.ReadNow(client, buf); m != 0 || err != nil {
		t.Fatalf("ReadNow with half a record = %d, %v; want 0, nil", m, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("ReadNow with half a record took %v: it waited", d)
	}
	if _, err := scork.Conn.Write(record[half:]); err != nil {
		t.Fatal(err)
	}
	n, err = client.Read(buf)
	if err != nil || !bytes.Equal(buf[:n], next) {
		t.Fatalf("Read after the rest arrived = %d bytes, %v; want the record's %d", n, err, len(next))
	}
}

// waitQueued waits until c's socket holds at least n bytes to read (TCP
// may pace what the other end sent).
func waitQueued(t *testing.T, c net.Conn, n int) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(wait)
	for {
		var q int
		var qerr error
		if err := rc.Control(func(fd uintptr) { q, qerr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
			t.Fatal(err)
		}
		if qerr != nil {
			t.Fatal(qerr)
		}
		if q >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the socket holds %d bytes after %v, want %d", q, wait, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestFramesOfSeveralRecordsAreCorked: frames that take several TLS
// records reach the socket in one write — a request's, so the peer reads
// them together, and a bulk transfer's, a write chunk of them at once (on
// a host whose TCP paces, the size of the writes to the mesh socket sets a
// transfer's speed) — and arrive whole.
func TestFramesOfSeveralRecordsAreCorked(t *testing.T) {
	cs, ss := tcpPair(t)
	counted := &proxytest.CountingConn{Conn: cs}
	ctls, stls, ccork, scork := corkedTLSPairOver(t, counted, ss)
	sizes, received := make(chan int, 1), make(chan []byte, 1)
	ended := make(chan error, 1)
	serveOn(t, stls, Options{Cork: scork}, func(s *Stream) {
		b := make([]byte, <-sizes)
		_, _ = io.ReadFull(s, b)
		received <- b
		rest, err := io.ReadAll(s)
		if err == nil && len(rest) > 0 {
			err = errors.New("bytes after the payload")
		}
		ended <- err
	})
	client := NewClient(ctls, Options{Cork: ccork})
	t.Cleanup(func() { client.Close() })

	for _, tc := range []struct {
		name       string
		size       int
		want, most int64 // socket writes
	}{
		{"request of two records", bulkChunk - 8<<10, 1, 1},
		// One write chunk: one write, unless the connection window the
		// server grants at once is not there yet and the chunk is framed
		// in parts (a few writes; record by record would be 33).
		{"bulk transfer", maxWriteChunk, 1, 4},
	} {
		s := open(t, client, "x:1")
		payload := randomBytes(tc.size)
		sizes <- len(payload)
		before := counted.Large.Load() // a control frame (a SETTINGS ack) may go out meanwhile on its own
		if _, err := s.Write(payload); err != nil {
			t.Fatal(err)
		}
		select {
		case b := <-received: // every write that carried it is done
			if !bytes.Equal(b, payload) {
				t.Errorf("%s: the server read other bytes than the %d sent", tc.name, len(payload))
			}
		case <-time.After(wait):
			t.Fatalf("%s: the server did not read the payload", tc.name)
		}
		n := counted.Large.Load() - before
		if n < tc.want || n > tc.most {
			t.Errorf("%s (%d bytes): %d socket writes of data, want %d to %d", tc.name, tc.size, n, tc.want, tc.most)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ended:
			if err != nil {
				t.Errorf("%s: the stream's end: %v", tc.name, err)
			}
		case <-time.After(wait):
			t.Fatalf("%s: the server did not read the stream to its end", tc.name)
		}
		s.Close()
	}
}
