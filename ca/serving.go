package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Renewal of the CA's own serving certificate: at half its life, retrying
// with capped exponential backoff if signing fails.
const (
	minRenewWait    = time.Second
	minRetryBackoff = time.Second
	maxRetryBackoff = time.Minute
)

// servingCert keeps the CA's TLS serving certificate fresh. The current
// certificate sits behind an atomic pointer; handshakes only load it.
type servingCert struct {
	issuer tlsmgr.Issuer
	// csr holds the SANs the CSR names: the issuer sets them anyway, but a
	// backend that signs the CSR as it is (cert-manager) needs them in it.
	csr x509.CertificateRequest
	ttl time.Duration
	log *slog.Logger
	now func() time.Time
	cur atomic.Pointer[tls.Certificate]
}

// get is tls.Config.GetCertificate.
func (s *servingCert) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := s.cur.Load()
	if c == nil {
		return nil, fmt.Errorf("ca serving certificate: %w", tlsmgr.ErrNoIdentity)
	}
	return c, nil
}

// renew issues a new certificate with a fresh key and swaps it in; it
// returns when the next renewal is due.
func (s *servingCert) renew(ctx context.Context) (time.Time, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return time.Time{}, fmt.Errorf("serving certificate key: %w", err)
	}
	tmpl := s.csr
	csr, err := x509.CreateCertificateRequest(rand.Reader, &tmpl, key)
	if err != nil {
		return time.Time{}, fmt.Errorf("serving certificate csr: %w", err)
	}
	issued, err := s.issuer.Issue(ctx, csr, s.ttl)
	if err != nil {
		return time.Time{}, fmt.Errorf("serving certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: issued.Chain[0]}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	s.cur.Store(cert)
	leaf := issued.Chain[0]
	now := s.now()
	s.log.Info("ca serving certificate issued", "serial", fmt.Sprintf("%x", leaf.SerialNumber),
		"not_after", leaf.NotAfter.UTC().Format(time.RFC3339), "dns", leaf.DNSNames)
	return now.Add(max(leaf.NotAfter.Sub(now)/2, minRenewWait)), nil
}

// run renews at each due time until ctx ends.
func (s *servingCert) run(ctx context.Context, due time.Time) {
	backoff := minRetryBackoff
	for {
		t := time.NewTimer(max(due.Sub(s.now()), 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		next, err := s.renew(ctx)
		if err == nil {
			due, backoff = next, minRetryBackoff
			continue
		}
		if ctx.Err() != nil {
			return
		}
		wait := backoff/2 + mrand.N(backoff/2+1)
		s.log.Error("ca serving certificate renewal failed; retrying", "err", err, "retry_in", wait.String())
		due = s.now().Add(wait)
		backoff = min(2*backoff, maxRetryBackoff)
	}
}
