package tlsmgr

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Reasons an SVID is refused; callers may branch on them with errors.Is.
var (
	ErrKeyMismatch = errors.New("certificate does not match private key")
	ErrNoSPIFFEID  = errors.New("certificate has no valid SPIFFE ID")
	ErrExpired     = errors.New("certificate is not valid now")
	ErrNoRoots     = errors.New("no trust anchors")
)

// verifySVID checks that chain (leaf first) and key form an X.509-SVID that
// is valid at now, chains to bundles, and (if td is set) belongs to td.
func verifySVID(chain []*x509.Certificate, key crypto.Signer, bundles x509bundle.Source, td spiffeid.TrustDomain, now time.Time) (*x509svid.SVID, error) {
	if len(chain) == 0 {
		return nil, errors.New("empty certificate chain")
	}
	leaf := chain[0]
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, ErrKeyMismatch
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoSPIFFEID, err)
	}
	if id.Path() == "" {
		return nil, fmt.Errorf("%w: %s names a trust domain, not a workload", ErrNoSPIFFEID, id)
	}
	if !td.IsZero() && id.TrustDomain() != td {
		return nil, fmt.Errorf("spiffe id %s is not in trust domain %s", id, td)
	}
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("%w: not valid before %s", ErrExpired, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if !now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("%w: expired at %s", ErrExpired, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, errors.New("leaf certificate lacks the digitalSignature key usage")
	}
	// Checks the CA flag and key usages of the leaf, and the chain to a root.
	if _, _, err := x509svid.Verify(chain, bundles, x509svid.WithTime(now)); err != nil {
		return nil, fmt.Errorf("verify chain of %s: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// mergeRoots returns the bundle of td holding every distinct root of sets.
func mergeRoots(td spiffeid.TrustDomain, sets ...[]*x509.Certificate) *x509bundle.Bundle {
	b := x509bundle.New(td)
	for _, set := range sets {
		for _, c := range set {
			b.AddX509Authority(c) // ignores duplicates
		}
	}
	return b
}

// checkRoots refuses trust anchors that are not CA certificates.
func checkRoots(roots []*x509.Certificate) error {
	for i, r := range roots {
		if !r.BasicConstraintsValid || !r.IsCA {
			return fmt.Errorf("root %d (%s) is not a CA certificate", i+1, r.Subject)
		}
	}
	return nil
}
