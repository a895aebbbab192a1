package ca

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/internal/watch"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Defaults of the directory watch.
const (
	DefaultReloadInterval = 5 * time.Second
	reloadDebounce        = 250 * time.Millisecond
)

// rotationOptions are the server options of this file.
type rotationOptions struct {
	dir        string
	load       func() (*Authority, error)
	poll       time.Duration
	bundleAddr string
	bundleHint time.Duration
}

// WithReload makes the server watch dir (file notifications, and a re-read
// every reload interval) and, when the files of the layout change, replace
// its authority with what load returns — the running server follows a root
// rotation without restart. A load that fails, or returns another trust
// domain, is logged and counted (meshproxy_config_reloads_total{kind="ca"})
// and the current authority stays. The server also records in dir, per
// root, when the certificates it signs expire (IssuedRecordFile), which
// RotateRoot consults before retiring a root.
func WithReload(dir string, load func() (*Authority, error)) ServerOption {
	return func(o *serverOptions) { o.rot.dir, o.rot.load = dir, load }
}

// WithReloadInterval sets how often WithReload re-reads the directory in case
// a change escaped file notifications (default DefaultReloadInterval).
func WithReloadInterval(d time.Duration) ServerOption {
	return func(o *serverOptions) { o.rot.poll = d }
}

// rotation is the server's state for reloads, the issuance record and the
// bundle endpoint.
type rotation struct {
	opts   rotationOptions
	issued *issuedLog // nil without WithReload

	mu         sync.Mutex
	bundleAddr net.Addr // bound bundle endpoint, once serving
}

func newRotation(o rotationOptions, s *Server) *rotation {
	if o.poll <= 0 {
		o.poll = DefaultReloadInterval
	}
	r := &rotation{opts: o}
	if o.dir != "" {
		r.issued = openIssuedLog(o.dir, s.log, time.Now)
	}
	return r
}

// authority is the authority in force.
func (s *Server) authority() *Authority { return s.cur.Load() }

// recordIssued counts a certificate signed under root, for RotateRoot's
// retire check.
func (s *Server) recordIssued(root *x509.Certificate, notAfter time.Time) {
	if s.rot.issued != nil && root != nil {
		s.rot.issued.record(root, notAfter)
	}
}

// startRotation starts the bundle endpoint, the issuance record and the
// directory watch; they stop when ctx ends, and wg waits for them.
func (s *Server) startRotation(ctx context.Context, wg *sync.WaitGroup) error {
	o := s.rot.opts
	if o.bundleAddr != "" {
		lis, err := net.Listen("tcp", o.bundleAddr)
		if err != nil {
			return fmt.Errorf("bundle endpoint %s: %w", o.bundleAddr, err)
		}
		s.rot.mu.Lock()
		s.rot.bundleAddr = lis.Addr()
		s.rot.mu.Unlock()
		wg.Go(func() { s.serveBundleEndpoint(ctx, lis) })
	}
	if s.rot.issued != nil {
		roots := s.authority().Roots()
		s.rot.issued.track(roots[0], roots)
		wg.Go(func() { s.rot.issued.run(ctx) })
	}
	if o.load != nil {
		wg.Go(func() { s.watchDir(ctx) })
	}
	return nil
}

// watchDir reloads the authority when the layout's files change, until ctx
// ends.
func (s *Server) watchDir(ctx context.Context) {
	o := s.rot.opts
	var r reloader
	// The authority was loaded before the watch began: Run looks once now.
	watch.Run(ctx, []string{o.dir}, func() { r.check(ctx, s) },
		watch.WithPoll(o.poll), watch.WithDebounce(reloadDebounce), watch.WithLogger(s.log.With("dir", o.dir)))
}

// reloader remembers what the directory looked like at the last reload and
// the last failure, so each state is loaded (and a failure reported) once.
type reloader struct {
	loaded, failed [sha256.Size]byte
}

func (r *reloader) check(ctx context.Context, s *Server) {
	o := s.rot.opts
	d, err := layoutDigest(o.dir)
	if err == nil && (d == r.loaded || d == r.failed) {
		return
	}
	cur := s.authority()
	var a *Authority
	if err == nil {
		var settled bool
		if a, d, settled, err = loadSettled(o, d); !settled {
			// Still being written: the next event or poll looks again.
			s.log.Debug("ca files changing while read; reload deferred", "dir", o.dir)
			return
		}
	}
	if err == nil && a.TrustDomain() != cur.TrustDomain() {
		err = fmt.Errorf("trust domain changed from %s to %s; restart the CA to change it", cur.TrustDomain().Name(), a.TrustDomain().Name())
	}
	if err != nil {
		if d != r.failed {
			metrics.ConfigReloads.WithLabelValues("ca", "failure").Inc()
			s.log.Error("ca reload failed; keeping the loaded CA", "dir", o.dir, "err", err)
		}
		r.failed = d
		return
	}
	r.loaded, r.failed = d, [sha256.Size]byte{}
	if sameAuthority(a, cur) {
		return
	}
	s.cur.Store(a)
	metrics.ConfigReloads.WithLabelValues("ca", "success").Inc()
	metrics.CARootExpiry.Set(float64(a.RootsNotAfter().Unix()))
	metrics.CAChainExpiry.Set(float64(a.NotAfter().Unix()))
	roots := a.Roots()
	fps := make([]string, len(roots))
	for i, c := range roots {
		fps[i] = short(Fingerprint(c))
	}
	s.log.Info("ca reloaded", "dir", o.dir, "roots", fps, "signing_root", fps[0],
		"chain_not_after", a.NotAfter().UTC().Format(time.RFC3339))
	if s.rot.issued != nil {
		s.rot.issued.track(roots[0], roots)
	}
	// The serving certificate follows the signing certificate at once, so
	// clients never need the old root to reach the CA after a switch.
	if _, err := s.serving.renew(ctx); err != nil && ctx.Err() == nil {
		s.log.Error("ca serving certificate renewal after reload failed; retrying on schedule", "err", err)
	}
}

// sameAuthority reports whether a and b sign with the same certificate and
// trust the same roots.
func sameAuthority(a, b *Authority) bool {
	return bytes.Equal(certsPEM(a.Chain()...), certsPEM(b.Chain()...)) &&
		bytes.Equal(certsPEM(a.Roots()...), certsPEM(b.Roots()...))
}

// layoutDigest hashes the files of the layout; a missing file hashes as
// such, any other read error is returned.
// loadSettled loads the directory whose digest was d and returns the digest
// of what was loaded: when the files change while they are read (a writer
// renaming one in), it loads again, so that a failure or success is recorded
// for the state actually read and not reported a second time for it.
// settled is false when the files kept changing; nothing should be recorded.
func loadSettled(o rotationOptions, d [sha256.Size]byte) (a *Authority, loaded [sha256.Size]byte, settled bool, err error) {
	for range 3 {
		a, err = o.load()
		after, derr := layoutDigest(o.dir)
		if derr != nil {
			return nil, after, true, derr
		}
		if after == d {
			return a, d, true, err
		}
		d = after
	}
	return nil, d, false, nil
}

func layoutDigest(dir string) ([sha256.Size]byte, error) {
	h := sha256.New()
	for _, name := range []string{RootCertFile, CACertFile, CertChainFile, CAKeyFile} {
		data, err := fileread.Read(filepath.Join(dir, name), fileread.MaxPEM)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			fmt.Fprintf(h, "%s:missing;", name)
			continue
		case err != nil:
			return [sha256.Size]byte{}, err // names the file
		}
		fmt.Fprintf(h, "%s:%d:", name, len(data))
		h.Write(data)
	}
	var d [sha256.Size]byte
	copy(d[:], h.Sum(nil))
	return d, nil
}

// currentIssuer signs with whichever authority is in force, so the serving
// certificate moves to the new signing certificate after a reload.
type currentIssuer struct {
	s   *Server
	id  spiffeid.ID
	dns []string
	ips []net.IP
}

// Issue implements tlsmgr.Issuer.
func (c *currentIssuer) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*tlsmgr.Issued, error) {
	return c.s.authority().Issuer(c.id, c.dns, c.ips).Issue(ctx, csrDER, ttl)
}

// currentBundle is the trust bundle of the authority in force, for the SVID
// authenticator: after a reload, renewals are checked against the new roots.
type currentBundle struct{ s *Server }

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (b currentBundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	a := b.s.authority()
	if td != a.TrustDomain() {
		return nil, fmt.Errorf("no X.509 bundle for trust domain %q", td)
	}
	return a.Bundle(), nil
}
