package tlsmgr

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	mrand "math/rand/v2"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/metrics"
)

var (
	_ Source   = (*Rotator)(nil)
	_ Notifier = (*Rotator)(nil)
	_ Source   = (*FileSource)(nil)
	_ Notifier = (*FileSource)(nil)
	_ Source   = (*Static)(nil)
	_ Notifier = (*Static)(nil)
)

// maxSleep bounds one wait of Run before the schedule is recomputed.
const maxSleep = time.Minute

// Rotator is a Source that obtains its SVID from a CA (an Issuer) and keeps
// renewing it: a fresh ECDSA P-256 key in memory for every renewal, a CSR,
// validation of what the CA returns, and an atomic swap. It renews at half
// the lifetime (± jitter), retries failures with exponential backoff, and
// keeps serving the current certificate until it expires.
//
// The trust bundle of the SVID's trust domain is the set of roots the CA
// returned with the last certificate, merged with the roots of WithBundleFile.
type Rotator struct {
	notifier
	snapshot
	issuer Issuer
	opts   options

	renewMu    sync.Mutex    // one renewal at a time
	reschedule chan struct{} // wakes Run after a forced renewal

	mu        sync.Mutex // guards the fields below and every swap of the snapshot
	failures  int
	caRoots   []*x509.Certificate
	fileRoots []*x509.Certificate
	fileSum   [32]byte
}

// NewRotator returns a Rotator that requests certificates from issuer. It
// holds no identity until Run (or Rotate) has obtained one; a configured
// bundle file is read now, and an unreadable one is an error.
func NewRotator(issuer Issuer, opts ...Option) (*Rotator, error) {
	if issuer == nil {
		return nil, errors.New("new rotator: issuer is nil")
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, fmt.Errorf("new rotator: %w", err)
	}
	r := &Rotator{snapshot: newSnapshot("ca", o.clock), issuer: issuer, opts: o, reschedule: make(chan struct{}, 1)}
	if o.bundleFile != "" {
		if _, err := r.loadBundleFile(); err != nil {
			return nil, fmt.Errorf("new rotator: %w", err)
		}
	}
	return r, nil
}

// Rotate implements Source: it renews the certificate now and returns the
// result. On failure the current certificate stays in use.
func (r *Rotator) Rotate(ctx context.Context) error {
	err := r.renew(ctx)
	select {
	case r.reschedule <- struct{}{}:
	default:
	}
	return err
}

// Run obtains the first certificate at once and then renews it until ctx
// ends; it also watches the bundle file, if any. Failures are retried with
// backoff and reported by Ready, Status, logs and metrics, so Run only
// returns (nil) when ctx ends.
func (r *Rotator) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if r.opts.bundleFile != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			watchFiles(ctx, []string{r.opts.bundleFile}, r.opts.pollInterval, r.opts.clock, r.opts.logger, r.reloadBundleFile)
		}()
	}

	var (
		planned   *x509svid.SVID // the SVID renewAt was computed for
		renewAt   time.Time
		plannedFx int // the failure count retryAt was computed for
		retryAt   time.Time
	)
	for {
		r.mu.Lock()
		failures := r.failures
		r.mu.Unlock()
		cur := r.current()
		now := r.opts.clock.Now()
		var wait time.Duration
		switch {
		case failures > 0:
			if failures != plannedFx {
				plannedFx = failures
				d := backoff(r.opts.backoffMin, r.opts.backoffMax, failures, mrand.Float64())
				retryAt = now.Add(d)
				r.opts.logger.Debug("certificate renewal retry scheduled", "failures", failures, "retry_in", d)
			}
			wait = retryAt.Sub(now)
		case cur == nil:
			wait = 0
		default:
			plannedFx = 0
			if cur.svid != planned {
				planned = cur.svid
				renewAt = r.opts.renewTime(cur, 2*mrand.Float64()-1)
				r.opts.logger.Debug("certificate renewal scheduled", "renew_at", renewAt, "not_after", cur.svid.Certificates[0].NotAfter)
			}
			wait = renewAt.Sub(now)
		}
		// Long waits are cut short and re-planned from the wall clock, so a
		// suspended host or a clock step cannot push a renewal past expiry.
		if wait > maxSleep {
			select {
			case <-ctx.Done():
				return nil
			case <-r.reschedule:
			case <-r.opts.clock.After(maxSleep):
			}
			continue
		}
		select {
		case <-ctx.Done():
			return nil
		case <-r.reschedule:
		case <-r.opts.clock.After(max(wait, 0)):
			_ = r.renew(ctx) // logged and counted by renew
		}
	}
}

// renewTime is when cur should be renewed: renewFraction of its lifetime
// plus jitter·lifetime, where j ∈ [-1, 1]. The lifetime counts from when the
// certificate was obtained if the CA back-dated NotBefore.
func (o *options) renewTime(cur *identity, j float64) time.Time {
	leaf := cur.svid.Certificates[0]
	start := leaf.NotBefore
	if cur.loadedAt.After(start) {
		start = cur.loadedAt
	}
	life := leaf.NotAfter.Sub(start)
	if life <= 0 {
		return start
	}
	return start.Add(time.Duration(float64(life) * (o.renewFraction + o.jitter*j)))
}

// backoff is the delay before retry number failures (≥ 1): min doubled per
// earlier failure, capped at max, then spread over [d/2, d] by u ∈ [0, 1).
func backoff(min, max time.Duration, failures int, u float64) time.Duration {
	d := max
	if failures < 1 {
		failures = 1
	}
	if shift := failures - 1; shift < 62 {
		if v := min << shift; v > 0 && v < max {
			d = v
		}
	}
	return d/2 + time.Duration(u*float64(d/2))
}

// renew performs one renewal and records its outcome.
func (r *Rotator) renew(ctx context.Context) error {
	r.renewMu.Lock()
	defer r.renewMu.Unlock()
	svid, roots, err := r.obtain(ctx)
	if err != nil && ctx.Err() != nil {
		return err // shutting down: not a CA failure
	}
	r.mu.Lock()
	if err != nil {
		r.setErr(err)
		r.failures++
		failures := r.failures
		r.mu.Unlock()
		metrics.CertRotations.WithLabelValues("failure").Inc()
		attrs := []any{"err", err, "failures", failures}
		if cur := r.current(); cur != nil {
			attrs = append(attrs, "spiffe_id", cur.svid.ID.String(), "current_not_after", cur.svid.Certificates[0].NotAfter)
		}
		r.opts.logger.Warn("certificate renewal failed", attrs...)
		return err
	}
	r.setErr(nil)
	r.failures = 0
	r.caRoots = roots
	bundle := mergeRoots(svid.ID.TrustDomain(), r.caRoots, r.fileRoots)
	next := newIdentity(svid, x509bundle.NewSet(bundle), r.nextGeneration())
	next.loadedAt = r.opts.clock.Now()
	r.swap(next)
	r.mu.Unlock()

	leaf := svid.Certificates[0]
	recordCertMetrics(leaf)
	metrics.CertRotations.WithLabelValues("success").Inc()
	r.opts.logger.Info("certificate rotated",
		"spiffe_id", svid.ID.String(),
		"serial", serialString(leaf.SerialNumber),
		"not_before", leaf.NotBefore,
		"not_after", leaf.NotAfter,
		"roots", len(bundle.X509Authorities()),
		"generation", next.gen)
	r.notify()
	return nil
}

// obtain generates a key, has the CA sign it and validates the answer: the
// SVID and the roots the CA returned with it.
func (r *Rotator) obtain(ctx context.Context) (*x509svid.SVID, []*x509.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	tmpl := &x509.CertificateRequest{}
	hint := r.opts.id
	if cur := r.current(); hint.IsZero() && cur != nil {
		hint = cur.svid.ID
	}
	if !hint.IsZero() {
		tmpl.URIs = []*url.URL{hint.URL()}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, nil, fmt.Errorf("create csr: %w", err)
	}
	ictx, cancel := context.WithTimeout(ctx, r.opts.issueTimeout)
	defer cancel()
	issued, err := r.issuer.Issue(ictx, csr, r.opts.ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("issue certificate: %w", err)
	}
	if issued == nil || len(issued.Chain) == 0 {
		return nil, nil, errors.New("issue certificate: CA returned no certificate")
	}
	if err := checkRoots(issued.Roots); err != nil {
		return nil, nil, fmt.Errorf("issued certificate: %w", err)
	}
	id, err := x509svid.IDFromCert(issued.Chain[0])
	if err != nil {
		return nil, nil, fmt.Errorf("issued certificate: %w: %w", ErrNoSPIFFEID, err)
	}
	r.mu.Lock()
	fileRoots := r.fileRoots
	r.mu.Unlock()
	bundle := mergeRoots(id.TrustDomain(), issued.Roots, fileRoots)
	if bundle.Empty() {
		return nil, nil, fmt.Errorf("issued certificate: %w: the CA returned no root and no bundle file is configured", ErrNoRoots)
	}
	svid, err := verifySVID(issued.Chain, key, bundle, r.opts.trustDomain, r.opts.clock.Now())
	if err != nil {
		return nil, nil, fmt.Errorf("issued certificate: %w", err)
	}
	return svid, issued.Roots, nil
}

// loadBundleFile reads the bundle file into r.fileRoots and reports
// whether its content changed.
func (r *Rotator) loadBundleFile() (bool, error) {
	data, sum, err := readFiles(r.opts.bundleFile)
	if err != nil {
		return false, fmt.Errorf("bundle file: %w", err)
	}
	r.mu.Lock()
	same := sum == r.fileSum
	r.mu.Unlock()
	if same {
		return false, nil
	}
	roots, err := ParseCertificatesPEM(data[0])
	if err == nil {
		err = checkRoots(roots)
	}
	if err != nil {
		return false, fmt.Errorf("bundle file %s: %w", r.opts.bundleFile, err)
	}
	r.mu.Lock()
	r.fileRoots, r.fileSum = roots, sum
	r.mu.Unlock()
	return true, nil
}

// reloadBundleFile applies a changed bundle file to the loaded identity.
func (r *Rotator) reloadBundleFile() {
	changed, err := r.loadBundleFile()
	if err != nil {
		metrics.ConfigReloads.WithLabelValues("bundle", "failure").Inc()
		r.opts.logger.Error("bundle file reload failed, keeping the previous roots", "err", err)
		return
	}
	if !changed {
		return
	}
	metrics.ConfigReloads.WithLabelValues("bundle", "success").Inc()
	r.mu.Lock()
	cur := r.current()
	if cur == nil {
		r.mu.Unlock()
		return
	}
	bundle := mergeRoots(cur.svid.ID.TrustDomain(), r.caRoots, r.fileRoots)
	next := newIdentity(cur.svid, x509bundle.NewSet(bundle), cur.gen+1)
	next.loadedAt = cur.loadedAt
	r.swap(next)
	r.mu.Unlock()
	r.opts.logger.Info("trust bundle reloaded", "file", r.opts.bundleFile, "roots", len(bundle.X509Authorities()), "generation", next.gen)
	r.notify()
}

// readiness is the Ready answer for a snapshot at now.
func readiness(cur *identity, now time.Time, lastErr error) error {
	var why error
	switch {
	case cur == nil:
		why = errors.New("no certificate loaded yet")
	case !now.Before(cur.svid.Certificates[0].NotAfter):
		why = fmt.Errorf("certificate expired at %s", cur.svid.Certificates[0].NotAfter.UTC().Format(time.RFC3339))
	case now.Before(cur.svid.Certificates[0].NotBefore):
		why = fmt.Errorf("certificate not valid before %s", cur.svid.Certificates[0].NotBefore.UTC().Format(time.RFC3339))
	default:
		return nil
	}
	if lastErr != nil {
		return fmt.Errorf("%w: %w; last error: %w", ErrNoIdentity, why, lastErr)
	}
	return fmt.Errorf("%w: %w", ErrNoIdentity, why)
}

// serialString formats a certificate serial as lowercase hex.
func serialString(n *big.Int) string { return fmt.Sprintf("%x", n) }
