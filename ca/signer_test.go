package ca

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// backend is an external CA in-process: it signs what the request asks for
// with a testpki intermediate, then lets a test case misbehave.
type backend struct {
	pki    *testpki.CA
	tamper func(req *SignRequest, tmpl *x509.Certificate)
	chain  func(leaf *x509.Certificate) []*x509.Certificate
	err    error
}

func (b *backend) Name() string               { return "testbackend" }
func (b *backend) Roots() []*x509.Certificate { return []*x509.Certificate{b.pki.Root} }

func (b *backend) Sign(_ context.Context, req *SignRequest) ([]*x509.Certificate, error) {
	if b.err != nil {
		return nil, b.err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(now.UnixNano()),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(req.TTL),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{req.ID.URL()},
		DNSNames:              req.DNSNames,
		IPAddresses:           req.IPAddresses,
	}
	pub := req.CSR.PublicKey
	if b.tamper != nil {
		b.tamper(req, tmpl)
		if tmpl.PublicKey != nil {
			pub = tmpl.PublicKey
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, b.pki.Intermediate, pub, b.pki.IntermediateKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	if b.chain != nil {
		return b.chain(leaf), nil
	}
	return []*x509.Certificate{leaf, b.pki.Intermediate}, nil
}

func TestNewFromSignerTrustDomain(t *testing.T) {
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	a, err := NewFromSigner(&backend{pki: pki})
	if err != nil {
		t.Fatal(err)
	}
	if a.TrustDomain().Name() != "cluster.local" || a.SignerName() != "testbackend" {
		t.Fatalf("trust domain %q signer %q", a.TrustDomain().Name(), a.SignerName())
	}
	if !a.NotAfter().IsZero() || len(a.Chain()) != 0 {
		t.Fatal("an external signer's chain is known before it issued anything")
	}
	if _, err := NewFromSigner(&backend{pki: pki}, WithTrustDomain(spiffeid.RequireTrustDomainFromString("example.org"))); !errors.Is(err, ErrInvalidCA) {
		t.Fatalf("roots of cluster.local accepted for example.org: %v", err)
	}
}

// TestExternalSignerResultIsChecked: whatever the backend returns, only an
// X.509-SVID for exactly the caller, over the CSR's key, chaining to the
// backend's roots and within the TTL rules is handed out.
func TestExternalSignerResultIsChecked(t *testing.T) {
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	other := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	short := testpki.NewWithTTL(t, "cluster.local", 2*time.Hour)
	foreign := testpki.NewWithTTL(t, "example.org", 7*24*time.Hour)
	caller := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	admin, _ := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")

	tests := []struct {
		name    string
		b       *backend
		wantErr string // "" = accepted
	}{
		{name: "honest backend", b: &backend{pki: pki}},
		{name: "root returned in the chain is tolerated", b: &backend{pki: pki, chain: func(l *x509.Certificate) []*x509.Certificate {
			return []*x509.Certificate{l, pki.Intermediate, pki.Root}
		}}},
		{name: "another identity", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.URIs = []*url.URL{admin} }}, wantErr: "is for spiffe://cluster.local/ns/kube-system/sa/admin"},
		{name: "a second URI SAN", b: &backend{pki: pki, tamper: func(r *SignRequest, c *x509.Certificate) { c.URIs = append(c.URIs, admin) }}, wantErr: "not an X.509-SVID"},
		{name: "no URI SAN", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.URIs = nil }}, wantErr: "not an X.509-SVID"},
		{name: "DNS SAN not asked for", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.DNSNames = []string{"bank.example"} }}, wantErr: `DNS SAN "bank.example"`},
		{name: "IP SAN not asked for", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.IPAddresses = []net.IP{net.IPv4(10, 0, 0, 1)} }}, wantErr: "IP SAN 10.0.0.1"},
		{name: "email SAN", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.EmailAddresses = []string{"a@b.c"} }}, wantErr: "email"},
		{name: "another key", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.PublicKey = testpki.NewKey(t).Public() }}, wantErr: "public key"},
		{name: "a CA certificate", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) {
			c.IsCA = true
			c.KeyUsage |= x509.KeyUsageCertSign
		}}, wantErr: "not an X.509-SVID"},
		{name: "no digitalSignature", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }}, wantErr: "digitalSignature"},
		{name: "serverAuth only", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		}}, wantErr: "clientAuth"},
		{name: "longer than the maximum", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.NotAfter = time.Now().Add(MaxTTL + time.Hour) }}, wantErr: "over the maximum"},
		{name: "not valid yet", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) { c.NotBefore = time.Now().Add(time.Hour) }}, wantErr: "not valid before"},
		{name: "already expired", b: &backend{pki: pki, tamper: func(_ *SignRequest, c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
		}}, wantErr: "not an X.509-SVID"},
		{name: "outlives its chain", b: &backend{pki: short}, wantErr: "outlives its issuing chain"},
		{name: "chains to another root", b: &backend{pki: other, chain: func(l *x509.Certificate) []*x509.Certificate {
			return []*x509.Certificate{l, other.Intermediate}
		}}, wantErr: "not an X.509-SVID"},
		{name: "another trust domain", b: &backend{pki: foreign, tamper: func(_ *SignRequest, c *x509.Certificate) {
			c.URIs = []*url.URL{spiffeid.RequireFromString("spiffe://example.org/ns/demo/sa/client").URL()}
		}}, wantErr: "not an X.509-SVID"},
		{name: "nothing returned", b: &backend{pki: pki, chain: func(*x509.Certificate) []*x509.Certificate { return nil }}, wantErr: "no certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The authority's roots are pki's, whatever the case signs with.
			b := *tt.b
			a, err := NewFromSigner(&signerWithRoots{Signer: &b, roots: []*x509.Certificate{pki.Root, short.Root}})
			if err != nil {
				t.Fatal(err)
			}
			key := p256(t)
			issued, err := a.SignChain(context.Background(), csrDER(t, key, nil), caller, 24*time.Hour)
			if tt.wantErr != "" {
				if !errors.Is(err, ErrBackendInvalid) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want ErrBackendInvalid mentioning %q", err, tt.wantErr)
				}
				if issued != nil {
					t.Fatal("a certificate came with the error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(issued.Chain) != 2 || !issued.Chain[1].Equal(pki.Intermediate) || !issued.Roots[0].Equal(pki.Root) {
				t.Fatalf("chain %d certificates, roots %d, want leaf+intermediate and the chain's root first", len(issued.Chain), len(issued.Roots))
			}
			if !a.NotAfter().Equal(pki.Intermediate.NotAfter) || len(a.Chain()) != 1 {
				t.Errorf("chain expiry %v not learnt from the issuance", a.NotAfter())
			}
		})
	}
}

// signerWithRoots overrides a signer's roots.
type signerWithRoots struct {
	Signer
	roots []*x509.Certificate
}

func (r *signerWithRoots) Roots() []*x509.Certificate { return r.roots }

func TestExternalSignerErrorsKeepTheirKind(t *testing.T) {
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	for _, want := range []error{ErrBackendUnavailable, ErrBackendRefused} {
		a, err := NewFromSigner(&backend{pki: pki, err: want})
		if err != nil {
			t.Fatal(err)
		}
		_, err = a.SignChain(context.Background(), csrDER(t, p256(t), nil), spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), 0)
		if !errors.Is(err, want) || !strings.Contains(err.Error(), "testbackend") {
			t.Errorf("err = %v, want %v naming the signer", err, want)
		}
	}
}
