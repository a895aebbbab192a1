package tlsmgr

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/metrics"
)

// FileSource is a Source backed by mounted PEM files: a certificate chain
// (leaf first), its private key (PKCS#8, SEC 1 or PKCS#1) and a trust
// bundle of one or more roots for the SVID's trust domain. Run reloads them
// when they change; a bad reload keeps the previous identity.
type FileSource struct {
	notifier
	snapshot
	certFile, keyFile, bundleFile string
	opts                          options

	// loadMu serialises loads. Only loads take it: handshakes, health
	// checks and Status read the snapshot, so a slow read never holds them.
	loadMu  sync.Mutex
	lastSum [sha256.Size]byte // digest of the last content tried
	lastOK  bool              // whether that content was loaded
}

// NewFileSource loads certFile, keyFile and bundleFile and returns a
// FileSource serving them. It refuses a certificate that does not match its
// key, carries no SPIFFE ID, has expired or does not chain to the bundle;
// the error names the file at fault. Options that apply: WithTrustDomain,
// WithPollInterval, WithClock, WithLogger.
func NewFileSource(certFile, keyFile, bundleFile string, opts ...Option) (*FileSource, error) {
	for _, f := range []struct{ name, path string }{{"cert", certFile}, {"key", keyFile}, {"bundle", bundleFile}} {
		if f.path == "" {
			return nil, fmt.Errorf("file source: %s file path is empty", f.name)
		}
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, fmt.Errorf("file source: %w", err)
	}
	s := &FileSource{snapshot: newSnapshot("files", o.clock), certFile: certFile, keyFile: keyFile, bundleFile: bundleFile, opts: o}
	if _, err := s.load(true); err != nil {
		return nil, err
	}
	return s, nil
}

// Rotate implements Source: it reloads the files now, even if they look
// unchanged, and returns the result. On failure the old identity stays.
func (s *FileSource) Rotate(context.Context) error {
	_, err := s.reload(true)
	return err
}

// Run watches the files (notifications on their directories, which also
// catches Kubernetes' ..data symlink swaps, plus a periodic check) and
// reloads them when their content changes, until ctx ends. It returns nil.
func (s *FileSource) Run(ctx context.Context) error {
	watchFiles(ctx, []string{s.certFile, s.keyFile, s.bundleFile}, s.opts.pollInterval, s.opts.clock, s.opts.logger, func() {
		_, _ = s.reload(false) // logged and counted by reload
	})
	return nil
}

// reload loads the files and records the outcome in logs and metrics.
func (s *FileSource) reload(force bool) (bool, error) {
	changed, err := s.load(force)
	if err != nil {
		metrics.ConfigReloads.WithLabelValues("cert", "failure").Inc()
		metrics.CertRotations.WithLabelValues("failure").Inc()
		cur := s.current()
		s.opts.logger.Error("certificate reload failed, keeping the loaded certificate", "err", err,
			"spiffe_id", cur.svid.ID.String(), "serial", serialString(cur.svid.Certificates[0].SerialNumber))
		return false, err
	}
	if changed {
		metrics.ConfigReloads.WithLabelValues("cert", "success").Inc()
		metrics.CertRotations.WithLabelValues("success").Inc()
	}
	return changed, nil
}

// load reads and validates the files and swaps them in if their content
// differs from the last attempt (or force is set). It reports whether a new
// identity was installed.
func (s *FileSource) load(force bool) (bool, error) {
	s.loadMu.Lock()
	defer s.loadMu.Unlock()
	data, sum, err := readFiles(s.certFile, s.keyFile, s.bundleFile)
	if err != nil {
		s.setErr(err)
		return false, err
	}
	if !force && sum == s.lastSum {
		if s.lastOK {
			s.setErr(nil) // readable again, and unchanged
		}
		return false, nil // nothing new; a bad version was already reported
	}
	s.lastSum, s.lastOK = sum, false
	svid, bundle, err := s.parse(data[0], data[1], data[2])
	if err != nil {
		s.setErr(err)
		return false, err
	}
	s.setErr(nil)
	s.lastOK = true
	gen := s.nextGeneration()
	next := newIdentity(svid, x509bundle.NewSet(bundle), gen)
	next.loadedAt = s.opts.clock.Now()
	s.swap(next)

	leaf := svid.Certificates[0]
	recordCertMetrics(leaf)
	s.opts.logger.Info("certificate loaded from files",
		"spiffe_id", svid.ID.String(),
		"serial", serialString(leaf.SerialNumber),
		"not_before", leaf.NotBefore,
		"not_after", leaf.NotAfter,
		"cert_file", s.certFile,
		"roots", len(bundle.X509Authorities()),
		"generation", gen)
	s.notify()
	return true, nil
}

// parse validates the three files' content; errors name the file at fault.
func (s *FileSource) parse(certPEM, keyPEM, bundlePEM []byte) (*x509svid.SVID, *x509bundle.Bundle, error) {
	chain, err := ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("cert file %s: %w", s.certFile, err)
	}
	key, err := ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("key file %s: %w", s.keyFile, err)
	}
	roots, err := ParseCertificatesPEM(bundlePEM)
	if err == nil {
		err = checkRoots(roots)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("bundle file %s: %w", s.bundleFile, err)
	}
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return nil, nil, fmt.Errorf("cert file %s: %w: %w", s.certFile, ErrNoSPIFFEID, err)
	}
	bundle := x509bundle.FromX509Authorities(id.TrustDomain(), roots)
	svid, err := verifySVID(chain, key, bundle, s.opts.trustDomain, s.opts.clock.Now())
	switch {
	case errors.Is(err, ErrKeyMismatch):
		return nil, nil, fmt.Errorf("cert file %s does not match key file %s: %w", s.certFile, s.keyFile, err)
	case err != nil:
		return nil, nil, fmt.Errorf("cert file %s (bundle %s): %w", s.certFile, s.bundleFile, err)
	}
	return svid, bundle, nil
}
