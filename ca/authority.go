package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Defaults of docs/CONTRACT.md ("Identity"): workload certificates live
// 24h unless asked otherwise, never more than 90 days.
const (
	DefaultTTL = 24 * time.Hour
	MaxTTL     = 2160 * time.Hour
)

// ClockSkew is how far before "now" issued certificates become valid, so a
// peer whose clock runs a little behind still accepts them.
const ClockSkew = 2 * time.Minute

// maxCSRSize bounds the CSR bytes the authority will parse.
const maxCSRSize = 64 << 10

// Authority issues workload certificates: it applies the caller-identity
// rules (trust domain, CSR checks, TTL policy) and delegates the signature to
// a Signer — its own CA key (New, Load) or an external CA (NewFromSigner).
// Whatever the Signer returns is checked before it is handed out. It is safe
// for concurrent use.
type Authority struct {
	td     spiffeid.TrustDomain
	signer Signer
	roots  []*x509.Certificate // trust bundle; the built-in chain's own root first
	// limit is the earliest expiry along the built-in signing chain and its
	// root: no certificate outlives it. Zero for external signers, whose
	// chain is known only from what they return.
	limit      time.Time
	last       atomic.Pointer[issuedPath] // path of the latest issuance
	defaultTTL time.Duration
	maxTTL     time.Duration
	now        func() time.Time
}

// issuedPath is a verified signing path without its leaf.
type issuedPath struct {
	chain    []*x509.Certificate // signing certificate, then intermediates; no root
	notAfter time.Time           // earliest expiry along chain and root
}

// Option configures an Authority.
type Option func(*options)

type options struct {
	td         spiffeid.TrustDomain
	defaultTTL time.Duration
	maxTTL     time.Duration
	now        func() time.Time
}

// WithTrustDomain sets the trust domain for a CA whose certificates carry no
// SPIFFE URI SAN. If they do carry one, it must be this trust domain.
func WithTrustDomain(td spiffeid.TrustDomain) Option {
	return func(o *options) { o.td = td }
}

// WithDefaultTTL sets the validity given when the caller asks for none
// (default DefaultTTL).
func WithDefaultTTL(d time.Duration) Option {
	return func(o *options) { o.defaultTTL = d }
}

// WithMaxTTL sets the longest validity a caller may ask for (default MaxTTL).
func WithMaxTTL(d time.Duration) Option {
	return func(o *options) { o.maxTTL = d }
}

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option {
	return func(o *options) { o.now = now }
}

// New builds an Authority signing with its own CA key (the built-in
// signer) from a signing key, the signing certificate followed by any
// intermediates (chain; a root in it is ignored), and the trust bundle
// (roots). It checks that key matches chain[0], that chain[0] is a CA and
// that it chains to one of roots now.
func New(key crypto.Signer, chain, roots []*x509.Certificate, opts ...Option) (*Authority, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: no signing certificate", ErrInvalidCA)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("%w: no root certificates", ErrInvalidCA)
	}
	cert := chain[0]
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("%w: signing certificate %q is not a CA (basicConstraints CA:TRUE missing)", ErrInvalidCA, cert.Subject)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%w: signing certificate %q lacks keyUsage keyCertSign", ErrInvalidCA, cert.Subject)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("%w: the key does not match signing certificate %q", ErrInvalidCA, cert.Subject)
	}
	if err := checkRoots(roots); err != nil {
		return nil, err
	}
	path, err := verifyChain(cert, chain[1:], roots, o.now())
	if err != nil {
		return nil, err
	}
	td, err := trustDomainOf(path, o.td)
	if err != nil {
		return nil, err
	}
	root := path[len(path)-1]
	a := &Authority{
		td:         td,
		signer:     &builtinSigner{key: key, chain: path[:len(path)-1]},
		roots:      append([]*x509.Certificate{root}, slices.DeleteFunc(slices.Clone(roots), root.Equal)...),
		limit:      pathNotAfter(path),
		defaultTTL: o.defaultTTL,
		maxTTL:     o.maxTTL,
		now:        o.now,
	}
	a.last.Store(&issuedPath{chain: path[:len(path)-1], notAfter: a.limit})
	return a, nil
}

func newOptions(opts []Option) (options, error) {
	o := options{defaultTTL: DefaultTTL, maxTTL: MaxTTL, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	if o.defaultTTL <= 0 || o.maxTTL <= 0 {
		return o, fmt.Errorf("default ttl %s and max ttl %s must be positive", o.defaultTTL, o.maxTTL)
	}
	if o.defaultTTL > o.maxTTL {
		return o, fmt.Errorf("default ttl %s exceeds max ttl %s", o.defaultTTL, o.maxTTL)
	}
	return o, nil
}

func checkRoots(roots []*x509.Certificate) error {
	for i, r := range roots {
		if !r.BasicConstraintsValid || !r.IsCA {
			return fmt.Errorf("%w: root %d (%q) is not a CA", ErrInvalidCA, i+1, r.Subject)
		}
	}
	return nil
}

// pathNotAfter is the earliest expiry along certs.
func pathNotAfter(certs []*x509.Certificate) time.Time {
	var t time.Time
	for _, c := range certs {
		if t.IsZero() || c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}

// verifyChain finds the path from cert through intermediates to one of the
// roots, preferring the one that stays valid longest.
func verifyChain(cert *x509.Certificate, intermediates, roots []*x509.Certificate, now time.Time) ([]*x509.Certificate, error) {
	rootPool, interPool := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	for _, c := range intermediates {
		if !slices.ContainsFunc(roots, c.Equal) && !c.Equal(cert) {
			interPool.AddCert(c)
		}
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots:         rootPool,
		Intermediates: interPool,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("%w: signing certificate %q does not chain to a root: %w", ErrInvalidCA, cert.Subject, err)
	}
	best, bestExp := chains[0], time.Time{}
	for _, ch := range chains {
		exp := ch[0].NotAfter
		for _, c := range ch {
			if c.NotAfter.Before(exp) {
				exp = c.NotAfter
			}
		}
		if exp.After(bestExp) {
			best, bestExp = ch, exp
		}
	}
	return best, nil
}

// trustDomainOf takes the trust domain from the first SPIFFE URI SAN along
// path (signing cert first) or from want; both present must agree.
func trustDomainOf(path []*x509.Certificate, want spiffeid.TrustDomain) (spiffeid.TrustDomain, error) {
	var found spiffeid.TrustDomain
	for _, c := range path {
		for _, u := range c.URIs {
			if u.Scheme != "spiffe" {
				continue
			}
			td, err := spiffeid.TrustDomainFromURI(u)
			if err != nil {
				return spiffeid.TrustDomain{}, fmt.Errorf("%w: certificate %q has a malformed SPIFFE URI SAN %q: %w", ErrInvalidCA, c.Subject, u, err)
			}
			found = td
			break
		}
		if !found.IsZero() {
			break
		}
	}
	switch {
	case found.IsZero() && want.IsZero():
		return spiffeid.TrustDomain{}, fmt.Errorf("%w: no SPIFFE URI SAN in the CA certificates; give the trust domain explicitly", ErrInvalidCA)
	case found.IsZero():
		return want, nil
	case !want.IsZero() && want != found:
		return spiffeid.TrustDomain{}, fmt.Errorf("%w: CA certificates are for trust domain %q, not %q", ErrInvalidCA, found, want)
	}
	return found, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// TrustDomain is the trust domain the authority issues identities in.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// Chain returns the signing certificate followed by its intermediates,
// without the root. For an external signer it is the chain of the latest
// certificate issued (empty before the first).
func (a *Authority) Chain() []*x509.Certificate {
	if p := a.last.Load(); p != nil {
		return slices.Clone(p.chain)
	}
	return nil
}

// Roots returns the trust bundle, the root the chain ends in first.
func (a *Authority) Roots() []*x509.Certificate { return slices.Clone(a.roots) }

// Bundle returns the trust bundle for the authority's trust domain.
func (a *Authority) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(a.td, a.roots)
}

// NotAfter is when the signing chain (or its root) expires; the built-in
// signer issues nothing past it. For an external signer it is the expiry of
// the latest chain issued along (zero before the first).
func (a *Authority) NotAfter() time.Time {
	if p := a.last.Load(); p != nil {
		return p.notAfter
	}
	return time.Time{}
}

// SignerName names the signer behind the authority ("builtin", "stepca",
// "vault").
func (a *Authority) SignerName() string { return a.signer.Name() }

// RootsNotAfter is when the earliest-expiring root of the bundle expires.
func (a *Authority) RootsNotAfter() time.Time {
	t := a.roots[0].NotAfter
	for _, r := range a.roots[1:] {
		if r.NotAfter.Before(t) {
			t = r.NotAfter
		}
	}
	return t
}

// MaxTTL is the longest validity a caller may request.
func (a *Authority) MaxTTL() time.Duration { return a.maxTTL }

// DefaultTTL is the validity of a certificate whose request names none.
func (a *Authority) DefaultTTL() time.Duration { return a.defaultTTL }

// extraSANs are DNS and IP SANs for the CA's own serving certificate;
// workload certificates never get them.
type extraSANs struct {
	dns []string
	ips []net.IP
}

// Sign issues a workload certificate for id over the public key of csr (PEM
// or DER) and returns the leaf; see SignChain.
func (a *Authority) Sign(csr []byte, id spiffeid.ID, ttl time.Duration) (*x509.Certificate, error) {
	issued, err := a.SignChain(context.Background(), csr, id, ttl)
	if err != nil {
		return nil, err
	}
	return issued.Chain[0], nil
}

// SignChain issues a workload certificate for id over the public key of csr
// (PEM or DER). Only the key is taken from the CSR, after its signature is
// verified; its subject, SANs and extensions are ignored. ttl <= 0 means the
// default TTL; ttl over the maximum is ErrTTLTooLong; the certificate never
// outlives the CA chain. id must be in the authority's trust domain. The
// result holds the leaf and the intermediates it verified along, and the
// trust bundle with the chain's root first. A certificate from the signer
// that breaks these rules is refused with ErrBackendInvalid.
func (a *Authority) SignChain(ctx context.Context, csr []byte, id spiffeid.ID, ttl time.Duration) (*tlsmgr.Issued, error) {
	return a.sign(ctx, csr, id, ttl, extraSANs{})
}

func (a *Authority) sign(ctx context.Context, csr []byte, id spiffeid.ID, ttl time.Duration, extra extraSANs) (*tlsmgr.Issued, error) {
	if id.IsZero() {
		return nil, errors.New("sign: empty SPIFFE ID")
	}
	if !id.MemberOf(a.td) {
		return nil, fmt.Errorf("sign csr for %s: %w %q", id, ErrOutsideTrustDomain, a.td)
	}
	req, err := parseCSR(csr)
	if err != nil {
		return nil, fmt.Errorf("sign csr for %s: %w", id, err)
	}
	if err := checkLeafKey(req.PublicKey); err != nil {
		return nil, fmt.Errorf("sign csr for %s: %w", id, err)
	}
	if err := req.CheckSignature(); err != nil {
		return nil, fmt.Errorf("sign csr for %s: %w: signature: %w", id, ErrBadCSR, err)
	}
	switch {
	case ttl <= 0:
		ttl = a.defaultTTL
	case ttl > a.maxTTL:
		return nil, fmt.Errorf("sign csr for %s: %w: %s > %s", id, ErrTTLTooLong, ttl, a.maxTTL)
	}
	now := a.now()
	notAfter := now.Add(ttl)
	if !a.limit.IsZero() && notAfter.After(a.limit) {
		notAfter = a.limit
	}
	if !notAfter.After(now) {
		return nil, fmt.Errorf("sign csr for %s: %w at %s", id, ErrCAExpired, a.limit.UTC().Format(time.RFC3339))
	}
	sr := &SignRequest{
		CSR:         req,
		ID:          id,
		TTL:         notAfter.Sub(now),
		NotBefore:   now.Add(-ClockSkew),
		NotAfter:    notAfter,
		DNSNames:    extra.dns,
		IPAddresses: extra.ips,
	}
	certs, err := a.signer.Sign(ctx, sr)
	if err != nil {
		return nil, fmt.Errorf("sign csr for %s with %s: %w", id, a.signer.Name(), err)
	}
	issued, err := a.checkIssued(certs, sr, a.now())
	if err != nil {
		return nil, fmt.Errorf("sign csr for %s: %w", id, err)
	}
	return issued, nil
}

// parseCSR accepts a PEM ("CERTIFICATE REQUEST" or "NEW CERTIFICATE
// REQUEST") or DER encoded CSR.
func parseCSR(data []byte) (*x509.CertificateRequest, error) {
	if len(data) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrBadCSR)
	}
	if len(data) > maxCSRSize {
		return nil, fmt.Errorf("%w: %d bytes exceeds the %d byte limit", ErrBadCSR, len(data), maxCSRSize)
	}
	der := data
	if trimmed := bytes.TrimSpace(data); bytes.HasPrefix(trimmed, []byte("-----BEGIN")) {
		block, rest := pem.Decode(trimmed)
		if block == nil {
			return nil, fmt.Errorf("%w: malformed PEM", ErrBadCSR)
		}
		if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
			return nil, fmt.Errorf("%w: PEM block %q is not a CERTIFICATE REQUEST", ErrBadCSR, block.Type)
		}
		if len(bytes.TrimSpace(rest)) != 0 {
			return nil, fmt.Errorf("%w: trailing data after the CERTIFICATE REQUEST block", ErrBadCSR)
		}
		der = block.Bytes
	}
	req, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	return req, nil
}

// Issuer returns a tlsmgr.Issuer that signs every CSR for id, for callers
// inside the CA process (its own serving certificate). The DNS names and IPs
// are added as SANs; workload certificates from Sign never carry them.
func (a *Authority) Issuer(id spiffeid.ID, dnsNames []string, ips []net.IP) tlsmgr.Issuer {
	return &localIssuer{a: a, id: id, extra: extraSANs{dns: slices.Clone(dnsNames), ips: slices.Clone(ips)}}
}

type localIssuer struct {
	a     *Authority
	id    spiffeid.ID
	extra extraSANs
}

// Issue implements tlsmgr.Issuer.
func (l *localIssuer) Issue(ctx context.Context, csrDER []byte, ttl time.Duration) (*tlsmgr.Issued, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return l.a.sign(ctx, csrDER, l.id, ttl, l.extra)
}
