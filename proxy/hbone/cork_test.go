package hbone

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

func TestCorkSendsManyRecordsInOneWrite(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	cert := testpki.TLSCertificate(ca.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour))
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root)
	cs, ss := tcpPair(t)
	counted := &countingConn{Conn: cs}
	cork := NewCorkConn(counted)
	client := tls.Client(cork, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: "x",
		InsecureSkipVerify: true, DynamicRecordSizingDisabled: true}) //nolint:gosec // the records are under test, not the verification
	server := tls.Server(ss, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}})
	const size = 100 << 10 // seven records
	got := make(chan []byte, 1)
	go func() {
		if server.Handshake() != nil {
			close(got)
			return
		}
		b := make([]byte, 2*size)
		_, _ = io.ReadFull(server, b)
		got <- b
	}()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	payload := randomBytes(size)
	before := counted.writes.Load()
	cork.Cork()
	if _, err := client.Write(payload); err != nil {
		t.Fatal(err)
	}
	if err := cork.Uncork(); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n != 1 {
		t.Errorf("corked: %d socket writes for %d bytes, want 1", n, size)
	}
	before = counted.writes.Load()
	if _, err := client.Write(payload); err != nil {
		t.Fatal(err)
	}
	if n := counted.writes.Load() - before; n < size/(16<<10) {
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
