package tlsmgr

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// errOutage is what the test CA answers while it is "down".
var errOutage = errors.New("ca unavailable: test outage")

// testIssuer is an in-process CA: it signs CSRs with a testpki intermediate
// for a fixed SPIFFE ID (the CA decides the identity, not the CSR).
type testIssuer struct {
	ca       atomic.Pointer[testpki.CA]
	id       spiffeid.ID
	ttl      time.Duration // granted lifetime; 0: what was asked
	backdate time.Duration // NotBefore = now - backdate
	down     atomic.Bool
	calls    atomic.Int64
	mu       sync.Mutex
	csrs     []*x509.CertificateRequest
}

func newTestIssuer(t testing.TB, ca *testpki.CA, id string, ttl time.Duration) *testIssuer {
	t.Helper()
	ti := &testIssuer{id: spiffeid.RequireFromString(id), ttl: ttl, backdate: 2 * time.Minute}
	ti.ca.Store(ca)
	return ti
}

func (ti *testIssuer) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*Issued, error) {
	ti.calls.Add(1)
	if ti.down.Load() {
		return nil, errOutage
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	ti.mu.Lock()
	ti.csrs = append(ti.csrs, csr)
	ti.mu.Unlock()
	if ti.ttl != 0 {
		ttl = ti.ttl
	}
	ca := ti.ca.Load()
	leaf, err := createLeaf(ca, csr.PublicKey, func(c *x509.Certificate) {
		c.URIs = []*url.URL{ti.id.URL()}
		c.NotBefore = time.Now().Add(-ti.backdate)
		c.NotAfter = time.Now().Add(ttl)
	})
	if err != nil {
		return nil, err
	}
	return &Issued{Chain: []*x509.Certificate{leaf, ca.Intermediate}, Roots: []*x509.Certificate{ca.Root}}, nil
}

func (ti *testIssuer) lastCSR() *x509.CertificateRequest {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	if len(ti.csrs) == 0 {
		return nil
	}
	return ti.csrs[len(ti.csrs)-1]
}

// issuerFunc adapts a function to Issuer.
type issuerFunc func(ctx context.Context, csrDER []byte, ttl time.Duration) (*Issued, error)

func (f issuerFunc) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*Issued, error) {
	return f(ctx, csrDER, ttl)
}

// signLeaf signs pub with ca's intermediate as a workload leaf valid for an
// hour, after edit has adjusted the template.
func signLeaf(t testing.TB, ca *testpki.CA, pub any, edit func(*x509.Certificate)) *x509.Certificate {
	t.Helper()
	c, err := createLeaf(ca, pub, edit)
	if err != nil {
		t.Fatalf("sign leaf: %v", err)
	}
	return c
}

func createLeaf(ca *testpki.CA, pub any, edit func(*x509.Certificate)) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if edit != nil {
		edit(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Intermediate, pub, ca.IntermediateKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// testLogger writes slog records to the test log and to buf (if non-nil).
func testLogger(t testing.TB, buf *syncBuffer) *slog.Logger {
	var w io.Writer = tWriter{t}
	if buf != nil {
		w = io.MultiWriter(w, buf)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// mtlsServer accepts connections on loopback, completes a handshake with
// cfg and answers one byte, so a client that reads it knows both sides
// verified each other.
type mtlsServer struct {
	ln  net.Listener
	wg  sync.WaitGroup
	cfg *tls.Config
}

func startServer(t testing.TB, cfg *tls.Config) *mtlsServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &mtlsServer{ln: ln, cfg: cfg}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				tc := tls.Server(c, s.cfg)
				if err := tc.Handshake(); err != nil {
					return
				}
				_, _ = tc.Write([]byte("k"))
				_ = tc.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	return s
}

// roundTrip dials s with cfg and reads the server's byte: nil means both
// sides accepted each other.
func (s *mtlsServer) roundTrip(cfg *tls.Config) (tls.ConnectionState, error) {
	d := &net.Dialer{Timeout: 30 * time.Second}
	raw, err := d.Dial("tcp", s.ln.Addr().String())
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(30 * time.Second))
	c := tls.Client(raw, cfg)
	if err := c.Handshake(); err != nil {
		return c.ConnectionState(), err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil {
		return c.ConnectionState(), err
	}
	return c.ConnectionState(), nil
}

// svidWithLeaf wraps a bare certificate, for schedule arithmetic.
func svidWithLeaf(c *x509.Certificate) *x509svid.SVID {
	return &x509svid.SVID{Certificates: []*x509.Certificate{c}}
}

// authorizeID is tlsconfig.AuthorizeID for a string.
func authorizeID(id string) tlsconfig.Authorizer {
	return tlsconfig.AuthorizeID(spiffeid.RequireFromString(id))
}

// fakeClock runs offset from the wall clock and hands out a test-driven
// channel for waits of exactly pollEvery (the file poll interval); armed
// (if set) receives a value each time such a wait begins.
type fakeClock struct {
	offset    atomic.Int64
	pollEvery time.Duration
	poll      chan time.Time
	armed     chan struct{}
}

func (c *fakeClock) Now() time.Time { return time.Now().Add(time.Duration(c.offset.Load())) }

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	if c.poll != nil && d == c.pollEvery {
		if c.armed != nil {
			select {
			case c.armed <- struct{}{}:
			default:
			}
		}
		return c.poll
	}
	return time.After(d)
}
