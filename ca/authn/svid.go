package authn

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// SVID authenticates a caller by the X.509-SVID it presented as TLS client
// certificate: the chain must verify against the trust bundles, and the
// caller is who the certificate says. This lets a workload renew its own
// identity without a token; it can never obtain another one, since the CA
// certifies the authenticated ID only.
type SVID struct {
	bundles x509bundle.Source
	now     func() time.Time
}

// NewSVID returns an authenticator verifying client certificates against
// bundles (the CA's own trust bundle).
func NewSVID(bundles x509bundle.Source, opts ...Option) *SVID {
	o := newOptions(opts)
	return &SVID{bundles: bundles, now: o.now}
}

// Name implements Authenticator.
func (s *SVID) Name() string { return "svid" }

// Authenticate implements Authenticator.
func (s *SVID) Authenticate(_ context.Context, c Caller) (spiffeid.ID, error) {
	if len(c.PeerCertificates) == 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: no client certificate", ErrNoCredentials)
	}
	id, _, err := x509svid.Verify(c.PeerCertificates, s.bundles, x509svid.WithTime(s.now()))
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: client certificate: %w", ErrUnauthenticated, err)
	}
	return id, nil
}
