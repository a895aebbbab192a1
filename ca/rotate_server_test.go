package ca

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/metrics"
)

// dirCA is a CA served from a directory it watches.
type dirCA struct {
	dir  string
	addr string
	srv  *Server
}

// serveDir serves the CA in dir with reloads on, token authentication
// (tokensFile) and opts.
func serveDir(t *testing.T, dir string, opts ...ServerOption) *dirCA {
	t.Helper()
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "tokens"), []byte(tokensFile))
	toks, err := authn.NewTokens(filepath.Join(dir, "tokens"), authn.WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	all := append([]ServerOption{
		WithLogger(quietLogger()),
		WithReload(dir, func() (*Authority, error) { return Load(dir) }),
		WithReloadInterval(100 * time.Millisecond),
	}, opts...)
	srv, err := NewServer(a, []authn.Authenticator{toks}, all...)
	if err != nil {
		t.Fatal(err)
	}
	addr, _, _ := serveForTest(t, srv)
	return &dirCA{dir: dir, addr: addr, srv: srv}
}

// issue asks the CA for a certificate valid for ttl, trusting the CA by the
// roots in root-cert.pem as they are now (as a sidecar re-reading --ca-root
// does). It returns the leaf, its intermediates and the roots answered.
func (d *dirCA) issue(t *testing.T, ttl time.Duration) (leaf *x509.Certificate, inter, roots []*x509.Certificate, err error) {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(readFile(t, filepath.Join(d.dir, RootCertFile)))
	cc, err := grpc.NewClient(d.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, err := pb.NewIstioCertificateServiceClient(cc).CreateCertificate(withToken(testCtx(t), "client-token"),
		&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil))), ValidityDuration: int64(ttl / time.Second)})
	if err != nil {
		return nil, nil, nil, err
	}
	var chain []*x509.Certificate
	for _, e := range resp.CertChain[:len(resp.CertChain)-1] {
		cs, err := parseCertsPEM([]byte(e))
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cs...)
	}
	if roots, err = parseCertsPEM([]byte(resp.CertChain[len(resp.CertChain)-1])); err != nil {
		t.Fatal(err)
	}
	return chain[0], chain[1:], roots, nil
}

// chainsTo reports whether leaf verifies through inter to root alone.
func chainsTo(leaf *x509.Certificate, inter []*x509.Certificate, root *x509.Certificate) bool {
	rp, ip := x509.NewCertPool(), x509.NewCertPool()
	rp.AddCert(root)
	for _, c := range inter {
		ip.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: rp, Intermediates: ip, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

// waitUntil retries fn every 50 ms until it succeeds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func rootsOf(t *testing.T, dir string) []*x509.Certificate {
	t.Helper()
	roots, err := parseCertsPEM(readFile(t, filepath.Join(dir, RootCertFile)))
	if err != nil {
		t.Fatal(err)
	}
	return roots
}

func TestServerFollowsRootRotationWithoutRestart(t *testing.T) {
	dir := initCA(t)
	d := serveDir(t, dir)
	oldRoot := rootsOf(t, dir)[0]

	leaf, inter, roots, err := d.issue(t, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !chainsTo(leaf, inter, oldRoot) || len(roots) != 1 {
		t.Fatalf("before the rotation: chains to the old root %v, %d roots", chainsTo(leaf, inter, oldRoot), len(roots))
	}

	rotate(t, dir, StepAdd)
	newRoot := rootsOf(t, dir)[1]
	waitUntil(t, 20*time.Second, "the CA answers both roots after add", func() error {
		leaf, inter, roots, err := d.issue(t, 2*time.Second)
		switch {
		case err != nil:
			return err
		case len(roots) != 2:
			return fmt.Errorf("%d roots", len(roots))
		case !chainsTo(leaf, inter, oldRoot):
			return errors.New("after add, certificates must still chain to the old root")
		}
		return nil
	})

	rotate(t, dir, StepSwitch)
	waitUntil(t, 20*time.Second, "certificates chain to the new root after switch", func() error {
		leaf, inter, roots, err := d.issue(t, 2*time.Second)
		switch {
		case err != nil:
			return err
		case !chainsTo(leaf, inter, newRoot):
			return errors.New("not under the new root yet")
		case len(roots) != 2 || !roots[0].Equal(newRoot):
			return fmt.Errorf("want both roots, the new (signing) one first; got %d", len(roots))
		}
		return nil
	})
	// The CA's own serving certificate moved too: a client trusting only
	// the new root reaches it.
	waitUntil(t, 20*time.Second, "serving certificate under the new root", func() error {
		pool := x509.NewCertPool()
		pool.AddCert(newRoot)
		conn, err := tls.Dial("tcp", d.addr, &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}})
		if err != nil {
			return err
		}
		return conn.Close()
	})

	// The issuance record holds retire back until the old certificates,
	// the one-hour one included, have expired.
	waitUntil(t, 10*time.Second, "issuance record written", func() error {
		st, err := RotationStatusOf(dir, time.Now())
		if err != nil {
			return err
		}
		if st.Outstanding == nil || !st.Outstanding.Recorded || st.Outstanding.Live < 2 {
			return fmt.Errorf("outstanding %+v", st.Outstanding)
		}
		return nil
	})
	if _, err := RotateRoot(dir, StepRetire); !errors.Is(err, ErrCertsOutstanding) {
		t.Fatalf("retire while certificates under the old root live: %v", err)
	}
	rotate(t, dir, StepRetire, WithInitClock(func() time.Time { return leaf.NotAfter.Add(time.Second) }))
	waitUntil(t, 20*time.Second, "the CA answers only the new root after retire", func() error {
		_, _, roots, err := d.issue(t, 2*time.Second)
		if err != nil {
			return err
		}
		if len(roots) != 1 || !roots[0].Equal(newRoot) {
			return fmt.Errorf("%d roots", len(roots))
		}
		return nil
	})
}

func TestServerKeepsLastGoodCAWhenFilesBreak(t *testing.T) {
	dir := initCA(t)
	d := serveDir(t, dir)
	root := rootsOf(t, dir)[0]
	failures := func() float64 { return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("ca", "failure")) }
	before := failures()

	writeFile(t, filepath.Join(dir, CACertFile), []byte("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"))
	waitUntil(t, 20*time.Second, "reload failure counted", func() error {
		if failures() <= before {
			return errors.New("not yet")
		}
		return nil
	})
	// The counter is process-wide: another test's CA winding down may add to
	// it at any time, so count from the first failure on.
	first := failures()
	leaf, inter, _, err := d.issue(t, time.Minute)
	if err != nil {
		t.Fatalf("CA stopped issuing after a bad file: %v", err)
	}
	if !chainsTo(leaf, inter, root) {
		t.Fatal("CA no longer signs with the last good certificate")
	}
	// A failure is reported once per bad state, not at every poll.
	time.Sleep(500 * time.Millisecond)
	if got := failures(); got != first {
		t.Fatalf("%v more failures counted for one bad state after the first, want 0", got-first)
	}
}

// A file renamed in while the CA reads the directory (here: during its first
// look) is one bad state and counts as one failure, not one for the state
// the read began in and another for the state it found.
func TestServerCountsABadStateOnceWhenItChangesDuringTheRead(t *testing.T) {
	dir := initCA(t)
	root := rootsOf(t, dir)[0]
	failures := func() float64 { return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("ca", "failure")) }
	before := failures()
	var once sync.Once
	d := serveDir(t, dir, WithReload(dir, func() (*Authority, error) {
		once.Do(func() {
			writeFile(t, filepath.Join(dir, CACertFile), []byte("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n"))
		})
		return Load(dir)
	}))
	waitUntil(t, 20*time.Second, "reload failure counted", func() error {
		if failures() <= before {
			return errors.New("not yet")
		}
		return nil
	})
	// Several polls (every 100 ms) see the same bad state.
	time.Sleep(time.Second)
	if got := failures() - before; got != 1 {
		t.Fatalf("%v failures counted for one bad state, want 1", got)
	}
	leaf, inter, _, err := d.issue(t, time.Minute)
	if err != nil {
		t.Fatalf("CA stopped issuing after a bad file: %v", err)
	}
	if !chainsTo(leaf, inter, root) {
		t.Fatal("CA no longer signs with the last good certificate")
	}
}
