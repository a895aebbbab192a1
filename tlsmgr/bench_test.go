package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// BenchmarkGetCertificate measures what every handshake pays to pick the
// current certificate: the ServerConfig callback over a Rotator.
func BenchmarkGetCertificate(b *testing.B) {
	ca := testpki.New(b, "cluster.local")
	r, err := NewRotator(newTestIssuer(b, ca, serverID, time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	if err := r.Rotate(context.Background()); err != nil {
		b.Fatal(err)
	}
	get := ServerConfig(r, nil).GetCertificate
	hello := &tls.ClientHelloInfo{}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if c, err := get(hello); c == nil || err != nil {
			b.Fatal("no certificate")
		}
	}
}

// benchPKI is one chain used by both handshake benchmarks: leaves with a
// SPIFFE ID and a DNS name, so plain crypto/tls can verify them too.
type benchPKI struct {
	ca             *testpki.CA
	server, client tls.Certificate
	serverSrc      *Static
	clientSrc      *Static
}

func newBenchPKI(b *testing.B) *benchPKI {
	ca := testpki.New(b, "cluster.local")
	s := ca.IssueLeaf(b, testpki.Leaf{ID: serverID, DNSNames: []string{"server.test"}})
	c := ca.IssueLeaf(b, testpki.Leaf{ID: clientID, DNSNames: []string{"client.test"}})
	return &benchPKI{
		ca: ca, server: testpki.TLSCertificate(s), client: testpki.TLSCertificate(c),
		serverSrc: NewStatic(s, ca.Bundle()), clientSrc: NewStatic(c, ca.Bundle()),
	}
}

// benchHandshake runs full (never resumed) mTLS handshakes over net.Pipe.
func benchHandshake(b *testing.B, scfg, ccfg *tls.Config) {
	scfg.SessionTicketsDisabled = true
	ccfg.ClientSessionCache = nil
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		sc, cc := net.Pipe()
		errc := make(chan error, 1)
		go func() {
			errc <- tls.Server(sc, scfg).Handshake()
		}()
		c := tls.Client(cc, ccfg)
		if err := c.Handshake(); err != nil {
			b.Fatalf("client handshake: %v", err)
		}
		if err := <-errc; err != nil {
			b.Fatalf("server handshake: %v", err)
		}
		// Close the pipe, not the TLS conns: close_notify would block on
		// the synchronous pipe with nobody reading.
		sc.Close()
		cc.Close()
	}
}

// BenchmarkHandshakeTLSMgr: ServerConfig/ClientConfig with SPIFFE
// verification in VerifyConnection.
func BenchmarkHandshakeTLSMgr(b *testing.B) {
	p := newBenchPKI(b)
	benchHandshake(b, ServerConfig(p.serverSrc, authorizeID(clientID)), ClientConfig(p.clientSrc, authorizeID(serverID)))
}

// BenchmarkHandshakeBareCryptoTLS: the same chain with crypto/tls's own
// verification (hostname for the server, CA pool for the client).
func BenchmarkHandshakeBareCryptoTLS(b *testing.B) {
	p := newBenchPKI(b)
	pool := x509.NewCertPool()
	pool.AddCert(p.ca.Root)
	scfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{p.server},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{ALPNIstio},
	}
	ccfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{p.client},
		RootCAs:      pool,
		ServerName:   "server.test",
		NextProtos:   []string{ALPNIstio},
	}
	benchHandshake(b, scfg, ccfg)
}
