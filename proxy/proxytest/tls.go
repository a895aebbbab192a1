package proxytest

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TLSPair runs a TLS 1.3 handshake over cs (client) and ss (server), under
// a throwaway CA, and returns both ends. Records are full size from the
// first byte (no dynamic record sizing), as a mesh connection's are. The
// channel is what such tests look at, not the verification: the client
// does not check the server's name.
func TLSPair(t testing.TB, cs, ss net.Conn) (client, server *tls.Conn) {
	t.Helper()
	ca := testpki.New(t, "cluster.local")
	cert := testpki.TLSCertificate(ca.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour))
	pool := x509.NewCertPool()
	pool.AddCert(ca.Root)
	client = tls.Client(cs, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, ServerName: "x",
		InsecureSkipVerify: true, DynamicRecordSizingDisabled: true}) //nolint:gosec // the channel is under test, not the verification
	server = tls.Server(ss, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		DynamicRecordSizingDisabled: true})
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return client, server
}

// CountingConn counts the writes that reach the connection it wraps.
type CountingConn struct {
	net.Conn
	Writes atomic.Int64
	Large  atomic.Int64 // writes of more than 1 KiB: not a lone control frame
}

// Write counts the write and passes it on.
func (c *CountingConn) Write(p []byte) (int, error) {
	c.Writes.Add(1)
	if len(p) > 1<<10 {
		c.Large.Add(1)
	}
	return c.Conn.Write(p)
}
