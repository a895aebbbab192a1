package proxy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
)

// writeCounter counts the writes that reach a socket.
type writeCounter struct {
	net.Conn
	writes atomic.Int64
}

func (c *writeCounter) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// TestMeshWritesOfSeveralRecordsAreCorked: in per-connection mode a write
// of the copy loop that takes several TLS records reaches the mesh socket
// in one write (on a host whose TCP paces, the size of those writes sets a
// transfer's speed); one record is one write; the peer reads every byte.
func TestMeshWritesOfSeveralRecordsAreCorked(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	cert := testpki.TLSCertificate(ca.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour))
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root)
	cs, ss := tcpPair(t)
	counted := &writeCounter{Conn: cs}
	cork := hb.NewCorkConn(counted)
	client := tls.Client(cork, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: "x",
		InsecureSkipVerify: true}) //nolint:gosec // the writes are under test, not the verification
	server := tls.Server(ss, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}})
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	mesh := gatheringTLS{client, cork}

	for _, tc := range []struct {
		name string
		size int
		want int64
	}{
		{"one record", 1 << 10, 1},
		{"a bulk write", 512 << 10, 1}, // 32 records
	} {
		payload := make([]byte, tc.size)
		for i := range payload {
			payload[i] = byte(i * 7 / 5)
		}
		got := make(chan []byte, 1)
		go func() {
			b := make([]byte, len(payload))
			_, _ = io.ReadFull(server, b)
			got <- b
		}()
		before := counted.writes.Load()
		if n, err := mesh.Write(payload); err != nil || n != len(payload) {
			t.Fatalf("%s: wrote %d, %v; want %d", tc.name, n, err, len(payload))
		}
		if n := counted.writes.Load() - before; n != tc.want {
			t.Errorf("%s (%d bytes): %d socket writes, want %d", tc.name, tc.size, n, tc.want)
		}
		select {
		case b := <-got:
			if !bytes.Equal(b, payload) {
				t.Errorf("%s: the peer read other bytes than the %d sent", tc.name, len(payload))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the peer did not read the write", tc.name)
		}
	}
}
