package tlsmgr

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

// rotatingCA is an issuer whose trust bundle changes the way a CA's does
// in a root rotation: it answers the roots set last, after lag more
// requests (a CA that reloads after its sidecars saw the file change).
type rotatingCA struct {
	ca    atomic.Pointer[testpki.CA] // signs
	roots atomic.Pointer[[]*x509.Certificate]
	next  atomic.Pointer[[]*x509.Certificate]
	lag   atomic.Int64
	calls atomic.Int64
}

func (r *rotatingCA) setRoots(roots []*x509.Certificate, lag int64) {
	r.next.Store(&roots)
	r.lag.Store(lag)
}

func (r *rotatingCA) Issue(_ context.Context, csrDER []byte, _ time.Duration) (*Issued, error) {
	r.calls.Add(1)
	if n := r.next.Load(); n != nil && r.lag.Add(-1) < 0 {
		r.roots.Store(n)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	ca := r.ca.Load()
	leaf, err := createLeaf(ca, csr.PublicKey, func(c *x509.Certificate) {
		c.URIs = []*url.URL{spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b").URL()}
	})
	if err != nil {
		return nil, err
	}
	return &Issued{Chain: []*x509.Certificate{leaf, ca.Intermediate}, Roots: *r.roots.Load()}, nil
}

func bundleSize(t *testing.T, src Source) int {
	t.Helper()
	b, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("cluster.local"))
	if err != nil {
		return 0
	}
	return len(b.X509Authorities())
}

func TestRootWatchRenewsWhenTheCARootsChange(t *testing.T) {
	old, next := testpki.New(t, "cluster.local"), testpki.New(t, "cluster.local")
	issuer := &rotatingCA{}
	issuer.ca.Store(old)
	issuer.roots.Store(&[]*x509.Certificate{old.Root})
	file := filepath.Join(t.TempDir(), "root-cert.pem")
	testpki.WriteFile(t, file, testpki.PEMCerts(old.Root))

	// A one-hour certificate: no scheduled renewal happens during the test.
	rot, err := NewRotator(issuer, WithTTL(time.Hour), WithLogger(testLogger(t, nil)), WithPollInterval(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	w := WatchRoots(rot, file, WithRenewSpread(100*time.Millisecond))
	w.retry = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitFor(t, "first certificate", func() error { return w.Ready() })
	if n := issuer.calls.Load(); n != 1 {
		t.Fatalf("%d requests at start, want 1 (the first look at the file is no change)", n)
	}

	// add: the new root is published; the CA already serves both.
	issuer.setRoots([]*x509.Certificate{old.Root, next.Root}, 0)
	testpki.WriteFile(t, file, testpki.PEMCerts(old.Root, next.Root))
	waitFor(t, "both roots trusted after the file changed", func() error {
		if n := bundleSize(t, w); n != 2 {
			return fmt.Errorf("%d roots", n)
		}
		return nil
	})

	// switch: the CA signs under the new root; the roots stay as they were.
	issuer.ca.Store(next)

	// retire: the file drops the old root before the CA reloads (it lags two
	// answers); the watch renews until the CA's answer agrees.
	calls := issuer.calls.Load()
	issuer.setRoots([]*x509.Certificate{next.Root}, 2)
	testpki.WriteFile(t, file, testpki.PEMCerts(next.Root))
	waitFor(t, "old root dropped once the CA caught up", func() error {
		if n := bundleSize(t, w); n != 1 {
			return fmt.Errorf("%d roots", n)
		}
		return nil
	})
	if got := issuer.calls.Load() - calls; got < 3 {
		t.Fatalf("%d renewals for a lagging CA, want at least 3", got)
	}

	// An invalid file is reported and renews nothing.
	failures := func() float64 {
		return testutil.ToFloat64(metrics.ConfigReloads.WithLabelValues("ca_roots", "failure"))
	}
	before, calls := failures(), issuer.calls.Load()
	testpki.WriteFile(t, file, []byte("not pem"))
	waitFor(t, "invalid roots file reported", func() error {
		if failures() <= before {
			return errors.New("not yet")
		}
		return nil
	})
	if issuer.calls.Load() != calls {
		t.Fatal("an invalid roots file triggered a renewal")
	}
	if n := bundleSize(t, w); n != 1 {
		t.Fatalf("trust changed after an invalid roots file: %d roots", n)
	}
}
