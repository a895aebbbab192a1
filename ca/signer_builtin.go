package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"math/big"
	"net/url"
	"slices"
)

// builtinSigner signs with the CA key of a plugged-in CA directory (New,
// Load): meshproxy is the CA.
type builtinSigner struct {
	key   crypto.Signer
	chain []*x509.Certificate // signing certificate, then intermediates; no root
}

// Name implements Signer.
func (b *builtinSigner) Name() string { return SignerBuiltin }

// Roots implements Signer; New keeps the trust bundle itself.
func (b *builtinSigner) Roots() []*x509.Certificate { return nil }

// Sign implements Signer: a leaf with the request's validity, the SPIFFE ID
// as only URI SAN, a random 128-bit serial and the key usages of
// docs/CONTRACT.md ("Identity").
func (b *builtinSigner) Sign(ctx context.Context, req *SignRequest) ([]*x509.Certificate, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	usage := x509.KeyUsageDigitalSignature
	if _, ok := req.CSR.PublicKey.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             req.NotBefore,
		NotAfter:              req.NotAfter,
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{req.ID.URL()},
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPAddresses,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, b.chain[0], req.CSR.PublicKey, b.key)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse issued certificate: %w", err)
	}
	return append([]*x509.Certificate{leaf}, slices.Clone(b.chain)...), nil
}
