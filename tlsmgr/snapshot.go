package tlsmgr

import (
	"crypto/tls"
	"fmt"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// snapshot holds a source's current identity behind an atomic pointer, so
// handshakes, health checks and the admin API only load it and never wait
// for a reload, and the error of the source's last attempt to change it.
// Rotator, FileSource, Static and WorkloadAPISource embed it for their
// Source accessors. Every accessor is nil-safe: before the first identity
// it reports ErrNoIdentity.
type snapshot struct {
	source string // Status().Source
	clock  Clock  // Ready's "now"

	cur     atomic.Pointer[identity]
	lastErr atomic.Pointer[error]
}

func newSnapshot(source string, clock Clock) snapshot {
	return snapshot{source: source, clock: clock}
}

// current is the identity in force; nil before the first one.
func (s *snapshot) current() *identity { return s.cur.Load() }

// swap installs id. Callers serialise swaps that derive id from current.
func (s *snapshot) swap(id *identity) { s.cur.Store(id) }

// nextGeneration is the generation the next identity should carry.
func (s *snapshot) nextGeneration() uint64 { return s.cur.Load().generation() + 1 }

// setErr records the outcome of the last attempt; nil clears it.
func (s *snapshot) setErr(err error) {
	if err == nil {
		s.lastErr.Store(nil)
		return
	}
	s.lastErr.Store(&err)
}

// lastError is the error of the last attempt, nil after a success.
func (s *snapshot) lastError() error {
	if p := s.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// errNoCertificate is preallocated so Certificate never allocates.
var errNoCertificate = fmt.Errorf("%w: no certificate issued yet", ErrNoIdentity)

// Certificate implements Source. It only loads a pointer.
func (s *snapshot) Certificate() (*tls.Certificate, error) { return s.cur.Load().certificate() }

// GetX509SVID implements x509svid.Source.
func (s *snapshot) GetX509SVID() (*x509svid.SVID, error) { return s.cur.Load().x509SVID() }

// GetX509BundleForTrustDomain implements x509bundle.Source: the bundles
// loaded with the current identity (own trust domain and federated ones).
func (s *snapshot) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.cur.Load().bundleFor(td)
}

// Generation implements Source: it changes with every new identity or
// bundle set, and is 0 before the first.
func (s *snapshot) Generation() uint64 { return s.cur.Load().generation() }

// Ready implements Source: nil while an unexpired certificate is loaded,
// even if the last attempt to change it failed; otherwise why not, with
// that attempt's error.
func (s *snapshot) Ready() error {
	return readiness(s.cur.Load(), s.clock.Now(), s.lastError())
}

// Status implements Source.
func (s *snapshot) Status() Status {
	return s.cur.Load().status(s.source, errText(s.lastError()))
}

func (id *identity) certificate() (*tls.Certificate, error) {
	if id != nil {
		return id.cert, nil
	}
	return nil, errNoCertificate
}

func (id *identity) x509SVID() (*x509svid.SVID, error) {
	if id != nil {
		return id.svid, nil
	}
	return nil, errNoCertificate
}

func (id *identity) bundleFor(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if id != nil {
		return id.bundles.GetX509BundleForTrustDomain(td)
	}
	return nil, fmt.Errorf("%w: no trust bundle for %s yet", ErrNoIdentity, td)
}

func (id *identity) generation() uint64 {
	if id != nil {
		return id.gen
	}
	return 0
}

// errText is err's message, or "" for nil.
func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
