package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ErrNoIdentity is returned while no valid certificate is loaded.
var ErrNoIdentity = errors.New("no valid identity loaded")

// Source is the identity the data plane consumes: the current SVID, the
// trust bundles, and a cached tls.Certificate for handshakes.
type Source interface {
	x509svid.Source
	x509bundle.Source
	// Certificate returns the current certificate for crypto/tls. It only
	// loads a pointer: no allocation, no lock.
	Certificate() (*tls.Certificate, error)
	// Generation changes whenever the SVID or the trust bundles change.
	Generation() uint64
	// Ready returns nil when an unexpired certificate is loaded, otherwise
	// an error saying why not.
	Ready() error
	// Status describes the loaded identity for the admin API.
	Status() Status
	// Rotate forces a renewal now (a reload for file sources).
	Rotate(ctx context.Context) error
}

// Status is a snapshot of the loaded identity.
type Status struct {
	ID           spiffeid.ID
	Serial       string
	NotBefore    time.Time
	NotAfter     time.Time
	Chain        []*x509.Certificate
	TrustDomains []spiffeid.TrustDomain
	Bundles      []*x509bundle.Bundle
	Source       string // "ca", "files", "workload-api", "static"
	LastError    string // last renewal/reload failure, if any
}

// Issuer turns a CSR into a certificate chain. The gRPC CA client and the
// CA's in-process signer both implement it.
type Issuer interface {
	Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*Issued, error)
}

// Issued is what a CA returned for a CSR.
type Issued struct {
	Chain []*x509.Certificate // leaf first, then intermediates (no root)
	Roots []*x509.Certificate // trust anchors returned with the chain
}
