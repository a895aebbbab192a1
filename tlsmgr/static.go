package tlsmgr

import (
	"context"
	"crypto/tls"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
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
	snapshot
	setMu sync.Mutex // one Set at a time, so each generation names one bundle set
}

// NewStatic returns a Source serving svid and trusting bundles.
func NewStatic(svid *x509svid.SVID, bundles ...*x509bundle.Bundle) *Static {
	s := &Static{snapshot: newSnapshot("static", realClock{})}
	s.Set(svid, bundles...)
	return s
}

// Set replaces the SVID and bundles; the next handshake uses them.
func (s *Static) Set(svid *x509svid.SVID, bundles ...*x509bundle.Bundle) {
	s.setMu.Lock()
	defer s.setMu.Unlock()
	s.swap(newIdentity(svid, x509bundle.NewSet(bundles...), s.nextGeneration()))
	s.notify()
}

// Rotate implements Source; a static identity has nothing to renew.
func (s *Static) Rotate(context.Context) error { return nil }
