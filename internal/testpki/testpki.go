// Package testpki builds throwaway SPIFFE PKIs for tests: a root, an
// intermediate under it, and X.509-SVIDs issued by the intermediate. Nothing
// is written to disk unless a test asks for it.
package testpki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CA is a root and an intermediate for one trust domain.
type CA struct {
	TrustDomain     spiffeid.TrustDomain
	Root            *x509.Certificate
	RootKey         *ecdsa.PrivateKey
	Intermediate    *x509.Certificate
	IntermediateKey *ecdsa.PrivateKey
}

// New makes a CA for trust domain td whose certificates are valid for a day.
func New(t testing.TB, td string) *CA {
	t.Helper()
	return NewWithTTL(t, td, 24*time.Hour)
}

// NewWithTTL makes a CA whose root and intermediate live for ttl.
func NewWithTTL(t testing.TB, td string, ttl time.Duration) *CA {
	t.Helper()
	trust, err := spiffeid.TrustDomainFromString(td)
	if err != nil {
		t.Fatalf("testpki: trust domain %q: %v", td, err)
	}
	now := time.Now()
	rootKey := NewKey(t)
	root := createCert(t, &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{td}, CommonName: "test root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trust.ID().URL()},
	}, nil, rootKey.Public(), rootKey)
	intKey := NewKey(t)
	inter := createCert(t, &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{td}, CommonName: "test intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(ttl),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trust.ID().URL()},
	}, root, intKey.Public(), rootKey)
	return &CA{TrustDomain: trust, Root: root, RootKey: rootKey, Intermediate: inter, IntermediateKey: intKey}
}

// NewKey returns a fresh ECDSA P-256 key.
func NewKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("testpki: generate key: %v", err)
	}
	return k
}

// Leaf describes a leaf certificate to issue; zero fields take defaults.
type Leaf struct {
	ID        string        // SPIFFE ID (URI SAN); empty for none
	TTL       time.Duration // default 1h
	NotBefore time.Time     // default now - 1 minute
	IsCA      bool          // issue a CA cert (for "CA used as leaf" tests)
	DNSNames  []string
	Key       crypto.Signer // default a new P-256 key
}

// Issue signs a leaf SVID for id valid for ttl.
func (ca *CA) Issue(t testing.TB, id string, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	return ca.IssueLeaf(t, Leaf{ID: id, TTL: ttl})
}

// IssueLeaf signs a leaf described by l and returns it as an SVID whose chain
// is [leaf, intermediate].
func (ca *CA) IssueLeaf(t testing.TB, l Leaf) *x509svid.SVID {
	t.Helper()
	if l.TTL == 0 {
		l.TTL = time.Hour
	}
	if l.NotBefore.IsZero() {
		l.NotBefore = time.Now().Add(-time.Minute)
	}
	key := l.Key
	if key == nil {
		key = NewKey(t)
	}
	tmpl := &x509.Certificate{
		NotBefore:             l.NotBefore,
		NotAfter:              l.NotBefore.Add(l.TTL),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  l.IsCA,
		DNSNames:              l.DNSNames,
	}
	if l.IsCA {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	var id spiffeid.ID
	if l.ID != "" {
		var err error
		id, err = spiffeid.FromString(l.ID)
		if err != nil {
			t.Fatalf("testpki: spiffe id %q: %v", l.ID, err)
		}
		tmpl.URIs = []*url.URL{id.URL()}
	}
	leaf := createCert(t, tmpl, ca.Intermediate, key.Public(), ca.IntermediateKey)
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf, ca.Intermediate}, PrivateKey: key}
}

// Bundle returns the trust bundle (the root) of the CA.
func (ca *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.TrustDomain, []*x509.Certificate{ca.Root})
}

// TLSCertificate converts an SVID into a tls.Certificate with its chain.
func TLSCertificate(s *x509svid.SVID) tls.Certificate {
	c := tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, cert := range s.Certificates {
		c.Certificate = append(c.Certificate, cert.Raw)
	}
	return c
}

// WriteSVID writes the SVID's chain, key and the CA's bundle as PEM files in
// dir (cert.pem, key.pem, bundle.pem) and returns their paths.
func (ca *CA) WriteSVID(t testing.TB, dir string, s *x509svid.SVID) (certFile, keyFile, bundleFile string) {
	t.Helper()
	certPEM, keyPEM, err := s.Marshal()
	if err != nil {
		t.Fatalf("testpki: marshal svid: %v", err)
	}
	certFile = filepath.Join(dir, "cert.pem")
	keyFile = filepath.Join(dir, "key.pem")
	bundleFile = filepath.Join(dir, "bundle.pem")
	WriteFile(t, certFile, certPEM)
	WriteFile(t, keyFile, keyPEM)
	WriteFile(t, bundleFile, PEMCerts(ca.Root))
	return certFile, keyFile, bundleFile
}

// PEMCerts encodes certificates as concatenated PEM blocks.
func PEMCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

// WriteFile writes data to path with mode 0600, failing the test on error.
func WriteFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatalf("testpki: write %s: %v", path, err)
	}
}

func createCert(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	t.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatalf("testpki: serial: %v", err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatalf("testpki: create certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("testpki: parse certificate: %v", err)
	}
	return cert
}
