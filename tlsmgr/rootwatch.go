package tlsmgr

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	mrand "math/rand/v2"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
)

// Defaults of RootWatch.
const (
	// DefaultRenewSpread is the window over which sidecars spread their
	// renewals after their CA's roots change, so a fleet does not ask at
	// once.
	DefaultRenewSpread = 10 * time.Second
	// rootRenewAttempts bounds the renewals made for one change of the
	// roots file while the CA has not caught up with it.
	rootRenewAttempts = 5
)

// RootWatch is a Rotator that also watches the file of roots it trusts its
// CA with (--ca-root: the CA's published trust bundle, such as Istio's
// istio-ca-root-cert ConfigMap or a CA directory's root-cert.pem) and renews
// promptly when that file changes — after a random delay within the renew
// spread. The renewal brings the CA's new trust bundle (the roots of its
// answer) to this sidecar. If the CA has not caught up yet (its answer's
// roots differ from the file's), it renews again with backoff, a bounded
// number of times. This is what moves a sidecar through a root rotation:
// it trusts a new root as soon as it is published and stops trusting a
// retired one as soon as it is withdrawn, without waiting for half-life.
type RootWatch struct {
	*Rotator
	path   string
	spread time.Duration
	// retry is the first delay between renewals while the CA lags.
	retry time.Duration

	mu      sync.Mutex
	sum     [sha256.Size]byte
	started bool
	readErr string // last read failure, reported once
	changed chan []*x509.Certificate
}

// RootWatchOption configures a RootWatch.
type RootWatchOption func(*RootWatch)

// WithRenewSpread sets the window of the random delay before the renewal
// that follows a change of the roots file (default DefaultRenewSpread).
func WithRenewSpread(d time.Duration) RootWatchOption {
	return func(w *RootWatch) {
		if d >= 0 {
			w.spread = d
		}
	}
}

// WatchRoots returns r, renewing also when the PEM roots in path change.
// Its Run runs r's and watches the file (r's poll interval, logger and
// clock apply).
func WatchRoots(r *Rotator, path string, opts ...RootWatchOption) *RootWatch {
	w := &RootWatch{Rotator: r, path: path, spread: DefaultRenewSpread, retry: time.Second, changed: make(chan []*x509.Certificate, 1)}
	for _, opt := range opts {
		opt(w)
	}
	return w
}

// Run runs the Rotator and the watch until ctx ends.
func (w *RootWatch) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	o := &w.opts
	// The baseline is the file as the rotator starts, taken before its first
	// certificate: were it left to the watcher's goroutine, a change made
	// right after start-up could become the baseline and never be acted on.
	w.check()
	wg.Go(func() { watchFiles(ctx, []string{w.path}, o.pollInterval, o.clock, o.logger, w.check) })
	wg.Go(func() { w.renewals(ctx) })
	return w.Rotator.Run(ctx)
}

// check notes a change of the roots file; the first look sets the baseline.
func (w *RootWatch) check() {
	data, sum, err := readFiles(w.path)
	w.mu.Lock()
	defer w.mu.Unlock()
	if err != nil {
		if msg := err.Error(); msg != w.readErr {
			w.readErr = msg
			w.opts.logger.Warn("ca roots file unreadable; keeping the trust bundle", "file", w.path, "err", err)
		}
		return
	}
	w.readErr = ""
	if w.started && sum == w.sum {
		return
	}
	first := !w.started
	w.started, w.sum = true, sum
	if first {
		return
	}
	roots, err := ParseCertificatesPEM(data[0])
	if err == nil {
		err = checkRoots(roots)
	}
	if err != nil {
		metrics.ConfigReloads.WithLabelValues("ca_roots", "failure").Inc()
		w.opts.logger.Error("ca roots file changed but is invalid; not renewing", "file", w.path, "err", err)
		return
	}
	metrics.ConfigReloads.WithLabelValues("ca_roots", "success").Inc()
	select {
	case <-w.changed: // replace a change not acted on yet
	default:
	}
	w.changed <- roots
}

// renewals renews after each change of the roots file until the CA's
// answer carries the file's roots.
func (w *RootWatch) renewals(ctx context.Context) {
	log := w.opts.logger
	for {
		var roots []*x509.Certificate
		select {
		case <-ctx.Done():
			return
		case roots = <-w.changed:
		}
		delay := time.Duration(mrand.Float64() * float64(w.spread))
		log.Info("ca roots changed; renewing", "file", w.path, "roots", len(roots), "in", delay.Round(time.Millisecond).String())
		retry := w.retry
	attempts:
		for attempt := 1; attempt <= rootRenewAttempts; attempt++ {
			select {
			case <-ctx.Done():
				return
			case roots = <-w.changed: // changed again: start over with the newest
				attempt, retry = 0, w.retry
				delay = time.Duration(mrand.Float64() * float64(w.spread))
				continue
			case <-w.opts.clock.After(delay):
			}
			if err := w.Rotate(ctx); err != nil {
				log.Warn("renewal after a ca roots change failed", "attempt", attempt, "err", err)
			} else if w.caRootsEqual(roots) {
				break attempts
			} else if attempt == rootRenewAttempts {
				log.Info("the CA's trust bundle still differs from the ca roots file; renewing on schedule from now", "file", w.path, "attempts", attempt)
			}
			delay, retry = retry, 2*retry
		}
	}
}

// caRootsEqual reports whether the roots of the CA's last answer are
// exactly roots.
func (w *RootWatch) caRootsEqual(roots []*x509.Certificate) bool {
	w.Rotator.mu.Lock()
	got := w.Rotator.caRoots
	w.Rotator.mu.Unlock()
	if len(got) != len(roots) {
		return false
	}
	for _, r := range roots {
		found := false
		for _, g := range got {
			if g.Equal(r) {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
