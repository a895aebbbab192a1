package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Signer names, the values of `ca serve --signer`.
const (
	SignerBuiltin = "builtin" // the CA key of a plugged-in CA directory
	SignerStepCA  = "stepca"  // a step-ca server (package ca/stepca)
	SignerVault   = "vault"   // a Vault PKI secrets engine (package ca/vault)

	SignerAWSPCA      = "awspca"      // an AWS Private CA (package ca/awspca)
	SignerGoogleCAS   = "googlecas"   // a Google Certificate Authority Service pool (package ca/googlecas)
	SignerCertManager = "certmanager" // cert-manager CertificateRequests (package ca/certmanager)
)

// Errors of external signers. The gRPC server maps them to status codes and
// metric reasons; signers wrap them with the backend's own message.
var (
	// ErrBackendUnavailable: the backend could not be reached, timed out or
	// answered that it is temporarily unable to sign (5xx, sealed, rate
	// limited); the caller may retry.
	ErrBackendUnavailable = errors.New("signing backend unavailable")
	// ErrBackendRefused: the backend answered but refused to sign (bad
	// credentials, a policy that does not allow the identity, a CSR it
	// rejects).
	ErrBackendRefused = errors.New("signing backend refused the request")
	// ErrBackendInvalid: the backend returned something that is not a valid
	// X.509-SVID for the request (wrong or extra SANs, another key, a CA
	// certificate, too long a validity, no chain to its roots).
	ErrBackendInvalid = errors.New("signing backend returned an invalid certificate")
)

// Signer signs workload certificates for requests the Authority has already
// checked: the caller is authenticated, the identity is in the trust domain,
// the CSR's signature and key are good and the TTL is allowed. A Signer is
// the CA key itself (New, Load) or an external CA (ca/stepca, ca/vault).
// Implementations must be safe for concurrent use.
type Signer interface {
	// Name identifies the signer in logs and errors ("builtin", "stepca",
	// "vault").
	Name() string
	// Roots returns the backend's root certificates: the trust anchors
	// issued certificates must chain to, and the trust bundle handed to
	// workloads. It is nil for the built-in signer.
	Roots() []*x509.Certificate
	// Sign returns the issued leaf followed by the intermediates up to one
	// of Roots (a root in the list is ignored). Errors from a backend wrap
	// ErrBackendUnavailable or ErrBackendRefused.
	Sign(ctx context.Context, req *SignRequest) ([]*x509.Certificate, error)
}

// SignRequest is a checked certificate request.
type SignRequest struct {
	// CSR is the parsed request; its signature has been verified. Only its
	// public key may be certified: its subject and SANs carry no authority.
	CSR *x509.CertificateRequest
	// ID is the authenticated caller's SPIFFE ID, the certificate's only
	// URI SAN.
	ID spiffeid.ID
	// TTL is the requested lifetime from now (> 0, at most the maximum).
	TTL time.Duration
	// NotBefore and NotAfter are the validity the authority computed (now
	// minus ClockSkew, now plus TTL), for signers that set times themselves.
	NotBefore, NotAfter time.Time
	// DNSNames and IPAddresses are SANs for the CA's own serving certificate;
	// they are empty for workload certificates.
	DNSNames    []string
	IPAddresses []net.IP
}

// backendClockSkew is how far an external signer's clock may run ahead of
// ours when its certificate's lifetime is checked against the maximum.
const backendClockSkew = 5 * time.Minute

// NewFromSigner builds an Authority that delegates signing to s, an external
// CA. The trust bundle is s.Roots(); the trust domain comes from a SPIFFE
// URI SAN in the roots or from WithTrustDomain (both present must agree).
// Every certificate s returns is checked (see SignChain) before use.
func NewFromSigner(s Signer, opts ...Option) (*Authority, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	roots := s.Roots()
	if len(roots) == 0 {
		return nil, fmt.Errorf("%w: signer %s has no root certificates", ErrInvalidCA, s.Name())
	}
	if err := checkRoots(roots); err != nil {
		return nil, fmt.Errorf("signer %s: %w", s.Name(), err)
	}
	td, err := trustDomainOf(roots, o.td)
	if err != nil {
		return nil, fmt.Errorf("signer %s: %w", s.Name(), err)
	}
	return &Authority{
		td:         td,
		signer:     s,
		roots:      slices.Clone(roots),
		defaultTTL: o.defaultTTL,
		maxTTL:     o.maxTTL,
		now:        o.now,
	}, nil
}

// checkIssued enforces the rules of docs/CONTRACT.md ("Identity") on what
// a signer returned, whatever the backend: the leaf is an X.509-SVID for
// exactly req.ID (its only URI SAN), chains to the authority's roots, certifies the CSR's key, is not a CA,
// carries no SAN that was not asked for, is usable for both ends of mutual
// TLS, and is valid now for at most the maximum TTL and no longer than its
// chain. It returns the leaf with the intermediates it verified along and
// the trust bundle, the chain's root first.
func (a *Authority) checkIssued(certs []*x509.Certificate, req *SignRequest, now time.Time) (*tlsmgr.Issued, error) {
	invalid := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrBackendInvalid, a.signer.Name(), fmt.Sprintf(format, args...))
	}
	if len(certs) == 0 || certs[0] == nil {
		return nil, invalid("no certificate returned")
	}
	leaf := certs[0]
	var intermediates []*x509.Certificate
	for _, c := range certs[1:] {
		if c != nil && !slices.ContainsFunc(a.roots, c.Equal) {
			intermediates = append(intermediates, c)
		}
	}
	if leaf.NotBefore.After(now) {
		return nil, invalid("certificate is not valid before %s (is the backend's clock ahead?)", leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	bundle := x509bundle.FromX509Authorities(a.td, a.roots)
	id, chains, err := x509svid.Verify(append([]*x509.Certificate{leaf}, intermediates...), bundle, x509svid.WithTime(now))
	if err != nil {
		return nil, invalid("not an X.509-SVID of trust domain %q chaining to its roots: %v", a.td.Name(), err)
	}
	if id != req.ID {
		return nil, invalid("certificate is for %s, want %s", id, req.ID)
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return nil, invalid("key usage lacks digitalSignature")
	}
	if !publicKeysEqual(req.CSR.PublicKey, leaf.PublicKey) {
		return nil, invalid("certificate does not certify the CSR's public key")
	}
	for _, n := range leaf.DNSNames {
		if !slices.Contains(req.DNSNames, n) {
			return nil, invalid("certificate carries DNS SAN %q that was not requested", n)
		}
	}
	for _, ip := range leaf.IPAddresses {
		if !slices.ContainsFunc(req.IPAddresses, ip.Equal) {
			return nil, invalid("certificate carries IP SAN %s that was not requested", ip)
		}
	}
	if len(leaf.EmailAddresses) > 0 {
		return nil, invalid("certificate carries email SANs %v", leaf.EmailAddresses)
	}
	if eku := leaf.ExtKeyUsage; len(eku) > 0 && !slices.Contains(eku, x509.ExtKeyUsageAny) &&
		(!slices.Contains(eku, x509.ExtKeyUsageServerAuth) || !slices.Contains(eku, x509.ExtKeyUsageClientAuth)) {
		return nil, invalid("extended key usage lacks serverAuth or clientAuth")
	}
	if life := leaf.NotAfter.Sub(now); life > a.maxTTL+backendClockSkew {
		return nil, invalid("certificate is valid for %s, over the maximum %s", life.Round(time.Second), a.maxTTL)
	}
	path := chains[0]
	for _, ch := range chains[1:] {
		if pathNotAfter(ch[1:]).After(pathNotAfter(path[1:])) {
			path = ch
		}
	}
	chainNotAfter := pathNotAfter(path[1:])
	if leaf.NotAfter.After(chainNotAfter) {
		return nil, invalid("certificate outlives its issuing chain (%s > %s)",
			leaf.NotAfter.UTC().Format(time.RFC3339), chainNotAfter.UTC().Format(time.RFC3339))
	}
	root := path[len(path)-1]
	a.last.Store(&issuedPath{chain: slices.Clone(path[1 : len(path)-1]), notAfter: chainNotAfter})
	return &tlsmgr.Issued{
		Chain: slices.Clone(path[:len(path)-1]),
		Roots: append([]*x509.Certificate{root}, slices.DeleteFunc(slices.Clone(a.roots), root.Equal)...),
	}, nil
}
