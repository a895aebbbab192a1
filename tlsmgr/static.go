package tlsmgr

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// identity is one immutable snapshot: an SVID, its tls.Certificate and the
// bundles it was loaded with. Sources swap whole snapshots atomically.
type identity struct {
	svid    *x509svid.SVID
	cert    *tls.Certificate
	bundles *x509bundle.Set
	gen     uint64
	// loadedAt is when this SVID was obtained; renewal is planned from it
	// when the CA back-dates NotBefore for clock skew.
	loadedAt time.Time
}

func newIdentity(svid *x509svid.SVID, bundles *x509bundle.Set, gen uint64) *identity {
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return &identity{svid: svid, cert: cert, bundles: bundles, gen: gen}
}

func (id *identity) status(source, lastErr string) Status {
	if id == nil {
		return Status{Source: source, LastError: lastErr}
	}
	leaf := id.svid.Certificates[0]
	st := Status{
		ID:        id.svid.ID,
		Serial:    serialString(leaf.SerialNumber),
		NotBefore: leaf.NotBefore,
		NotAfter:  leaf.NotAfter,
		Chain:     id.svid.Certificates,
		Source:    source,
		LastError: lastErr,
	}
	for _, b := range id.bundles.Bundles() {
		st.TrustDomains = append(st.TrustDomains, b.TrustDomain())
		st.Bundles = append(st.Bundles, b)
	}
	return st
}

// Static is a Source with a fixed SVID and bundle set, for tests and tools.
// It notifies subscribers when Set replaces them.
type Static struct {
	notifier
	setMu sync.Mutex // one Set at a time, so each generation names one bundle set
	cur   atomic.Pointer[identity]
}

// NewStatic returns a Source serving svid and trusting bundles.
func NewStatic(svid *x509svid.SVID, bundles ...*x509bundle.Bundle) *Static {
	s := &Static{}
	s.Set(svid, bundles...)
	return s
}

// Set replaces the SVID and bundles; the next handshake uses them.
func (s *Static) Set(svid *x509svid.SVID, bundles ...*x509bundle.Bundle) {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	var gen uint64 = 1
	if old := s.cur.Load(); old != nil {
		gen = old.gen + 1
	}
	s.cur.Store(newIdentity(svid, x509bundle.NewSet(bundles...), gen))
	s.notify()
}

// GetX509SVID implements x509svid.Source.
func (s *Static) GetX509SVID() (*x509svid.SVID, error) { return s.cur.Load().svid, nil }

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *Static) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.cur.Load().bundles.GetX509BundleForTrustDomain(td)
}

// Certificate implements Source.
func (s *Static) Certificate() (*tls.Certificate, error) { return s.cur.Load().cert, nil }

// Generation implements Source.
func (s *Static) Generation() uint64 { return s.cur.Load().gen }

// Ready implements Source.
func (s *Static) Ready() error {
	if time.Now().After(s.cur.Load().svid.Certificates[0].NotAfter) {
		return fmt.Errorf("%w: certificate expired", ErrNoIdentity)
	}
	return nil
}

// Status implements Source.
func (s *Static) Status() Status { return s.cur.Load().status("static", "") }

// Rotate implements Source; a static identity has nothing to renew.
func (s *Static) Rotate(context.Context) error { return nil }
