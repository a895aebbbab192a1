package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// testAuthority builds an Authority over a testpki CA living ttl.
func testAuthority(t testing.TB, ttl time.Duration, opts ...Option) (*Authority, *testpki.CA) {
	t.Helper()
	pki := testpki.NewWithTTL(t, "cluster.local", ttl)
	a, err := New(pki.IntermediateKey, []*x509.Certificate{pki.Intermediate}, []*x509.Certificate{pki.Root}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return a, pki
}

func TestSignRules(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	a, pki := testAuthority(t, 30*24*time.Hour, WithClock(func() time.Time { return now }))
	caller := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")

	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	rsa2048, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	basicCATrue, err := asn1.Marshal(struct {
		IsCA       bool `asn1:"optional"`
		MaxPathLen int  `asn1:"optional,default:-1"`
	}{true, 3})
	if err != nil {
		t.Fatal(err)
	}
	tampered := csrDER(t, p256(t), &x509.CertificateRequest{Subject: pkix.Name{CommonName: "aaaaaaaa"}})
	tampered = bytes.Replace(tampered, []byte("aaaaaaaa"), []byte("bbbbbbbb"), 1)

	tests := []struct {
		name    string
		csr     []byte
		id      spiffeid.ID
		ttl     time.Duration
		wantErr error
		check   func(t *testing.T, leaf *x509.Certificate)
	}{
		{
			name: "foreign SANs, CN and extensions replaced by the caller's ID",
			csr: csrPEM(csrDER(t, p256(t), &x509.CertificateRequest{
				Subject:        pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
				DNSNames:       []string{"evil.example.com"},
				EmailAddresses: []string{"root@example.com"},
				IPAddresses:    []net.IP{net.IPv4(10, 0, 0, 1)},
				URIs:           []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/kube-system/sa/admin"}},
				ExtraExtensions: []pkix.Extension{
					{Id: asn1.ObjectIdentifier{2, 5, 29, 37}, Value: mustASN1(t, []asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 3}})}, // codeSigning EKU
				},
			})),
			id: caller,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if len(leaf.URIs) != 1 || leaf.URIs[0].String() != caller.String() {
					t.Errorf("URIs = %v, want only %s", leaf.URIs, caller)
				}
				if len(leaf.DNSNames)+len(leaf.EmailAddresses)+len(leaf.IPAddresses) != 0 {
					t.Errorf("CSR SANs leaked: %v %v %v", leaf.DNSNames, leaf.EmailAddresses, leaf.IPAddresses)
				}
				if leaf.Subject.String() != "" {
					t.Errorf("subject = %q, want empty", leaf.Subject)
				}
				for _, e := range leaf.ExtKeyUsage {
					if e == x509.ExtKeyUsageCodeSigning {
						t.Error("CSR extension copied into the certificate")
					}
				}
			},
		},
		{
			name: "CA:true CSR gives a plain leaf",
			csr: csrDER(t, p256(t), &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{
				{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: basicCATrue},
				{Id: asn1.ObjectIdentifier{2, 5, 29, 15}, Critical: true, Value: mustASN1(t, asn1.BitString{Bytes: []byte{0x06}, BitLength: 7})}, // keyCertSign|cRLSign
			}}),
			id: caller,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if leaf.IsCA || !leaf.BasicConstraintsValid {
					t.Errorf("IsCA=%v BasicConstraintsValid=%v, want CA:FALSE", leaf.IsCA, leaf.BasicConstraintsValid)
				}
				if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
					t.Errorf("key usage %b lets the leaf sign certificates", leaf.KeyUsage)
				}
			},
		},
		{
			name: "ECDSA P-256 leaf properties",
			csr:  csrDER(t, p256(t), nil),
			id:   caller,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
					t.Errorf("key usage = %b, want digitalSignature only", leaf.KeyUsage)
				}
				if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
					t.Errorf("EKU = %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
				}
				if bits := leaf.SerialNumber.BitLen(); bits < 96 || bits > 128 {
					t.Errorf("serial has %d bits, want a random 128-bit value", bits)
				}
				if !leaf.NotBefore.Equal(now.Add(-2 * time.Minute)) {
					t.Errorf("NotBefore = %v, want now - 2m", leaf.NotBefore)
				}
				if got := leaf.NotAfter.Sub(now); got != 24*time.Hour {
					t.Errorf("default lifetime = %v, want 24h", got)
				}
				id, _, err := x509svid.Verify([]*x509.Certificate{leaf, pki.Intermediate}, pki.Bundle())
				if err != nil || id != caller {
					t.Errorf("issued SVID does not verify: %v %v", id, err)
				}
			},
		},
		{
			name: "RSA-2048 adds keyEncipherment",
			csr:  csrDER(t, rsa2048, nil),
			id:   caller,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
					t.Errorf("key usage = %b, want digitalSignature|keyEncipherment", leaf.KeyUsage)
				}
			},
		},
		{name: "ECDSA P-384 accepted", csr: csrDER(t, p384, nil), id: caller},
		{name: "RSA-1024 refused", csr: csrDER(t, rsa1024, nil), id: caller, wantErr: ErrUnsupportedKey},
		{name: "P-224 refused", csr: p224CSR(t), id: caller, wantErr: ErrUnsupportedKey},
		{name: "Ed25519 refused", csr: csrDER(t, edKey, nil), id: caller, wantErr: ErrUnsupportedKey},
		{name: "tampered CSR refused", csr: tampered, id: caller, wantErr: ErrBadCSR},
		{name: "garbage refused", csr: []byte("not a csr"), id: caller, wantErr: ErrBadCSR},
		{name: "empty refused", csr: nil, id: caller, wantErr: ErrBadCSR},
		{name: "certificate instead of CSR refused", csr: testpki.PEMCerts(pki.Root), id: caller, wantErr: ErrBadCSR},
		{name: "oversized CSR refused", csr: bytes.Repeat([]byte("A"), maxCSRSize+1), id: caller, wantErr: ErrBadCSR},
		{name: "identity outside the trust domain refused", csr: csrDER(t, p256(t), nil), id: spiffeid.RequireFromString("spiffe://other.org/ns/a/sa/b"), wantErr: ErrOutsideTrustDomain},
		{
			name: "explicit TTL", csr: csrDER(t, p256(t), nil), id: caller, ttl: time.Hour,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if got := leaf.NotAfter.Sub(now); got != time.Hour {
					t.Errorf("lifetime = %v, want 1h", got)
				}
			},
		},
		{
			name: "TTL of exactly the maximum", csr: csrDER(t, p256(t), nil), id: caller, ttl: MaxTTL,
			check: func(t *testing.T, leaf *x509.Certificate) {
				// The test CA lives 30 days, less than the 90-day maximum.
				if !leaf.NotAfter.Equal(pki.Root.NotAfter) {
					t.Errorf("NotAfter = %v, want capped at the chain's %v", leaf.NotAfter, pki.Root.NotAfter)
				}
			},
		},
		{name: "TTL over the maximum refused", csr: csrDER(t, p256(t), nil), id: caller, ttl: MaxTTL + time.Second, wantErr: ErrTTLTooLong},
		{
			name: "negative TTL means default", csr: csrDER(t, p256(t), nil), id: caller, ttl: -time.Hour,
			check: func(t *testing.T, leaf *x509.Certificate) {
				if got := leaf.NotAfter.Sub(now); got != DefaultTTL {
					t.Errorf("lifetime = %v, want default", got)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leaf, err := a.Sign(tt.csr, tt.id, tt.ttl)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if leaf != nil {
					t.Fatal("certificate returned with an error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.check != nil {
				tt.check(t, leaf)
			}
		})
	}
}

func mustASN1(t *testing.T, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSignCapsAtChainExpiry(t *testing.T) {
	a, pki := testAuthority(t, 2*time.Hour)
	leaf, err := a.Sign(csrDER(t, p256(t), nil), spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if !leaf.NotAfter.Equal(pki.Intermediate.NotAfter) {
		t.Fatalf("NotAfter = %v, want the chain's %v", leaf.NotAfter, pki.Intermediate.NotAfter)
	}
	if !a.NotAfter().Equal(pki.Intermediate.NotAfter) {
		t.Fatalf("Authority.NotAfter = %v", a.NotAfter())
	}

	// Once the chain has expired nothing is issued.
	later := pki.Intermediate.NotAfter.Add(time.Minute)
	expired, err := New(pki.IntermediateKey, []*x509.Certificate{pki.Intermediate}, []*x509.Certificate{pki.Root})
	if err != nil {
		t.Fatal(err)
	}
	expired.now = func() time.Time { return later }
	if _, err := expired.Sign(csrDER(t, p256(t), nil), spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), 0); !errors.Is(err, ErrCAExpired) {
		t.Fatalf("err = %v, want ErrCAExpired", err)
	}
}

func TestSerialsAreUnique(t *testing.T) {
	a, _ := testAuthority(t, time.Hour)
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	csr := csrDER(t, p256(t), nil)
	seen := map[string]bool{}
	for range 50 {
		leaf, err := a.Sign(csr, id, 0)
		if err != nil {
			t.Fatal(err)
		}
		s := leaf.SerialNumber.String()
		if seen[s] {
			t.Fatalf("serial %s issued twice", s)
		}
		seen[s] = true
	}
}

func TestTTLOptionsValidated(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	tests := []struct {
		name string
		opts []Option
	}{
		{"default over max", []Option{WithDefaultTTL(48 * time.Hour), WithMaxTTL(24 * time.Hour)}},
		{"zero max", []Option{WithMaxTTL(0)}},
		{"negative default", []Option{WithDefaultTTL(-time.Hour)}},
	}
	for _, tt := range tests {
		if _, err := New(pki.IntermediateKey, []*x509.Certificate{pki.Intermediate}, []*x509.Certificate{pki.Root}, tt.opts...); err == nil {
			t.Errorf("%s: accepted", tt.name)
		}
	}
}

func TestIssuerForServingCertificate(t *testing.T) {
	a, pki := testAuthority(t, 48*time.Hour)
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca")
	iss := a.Issuer(id, []string{"localhost", "ca.example"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	key := p256(t)
	issued, err := iss.Issue(context.Background(), csrDER(t, key, nil), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := issued.Chain[0]
	if len(issued.Chain) != 2 || !issued.Chain[1].Equal(pki.Intermediate) {
		t.Fatalf("chain = %d certs, want leaf + intermediate", len(issued.Chain))
	}
	if len(issued.Roots) != 1 || !issued.Roots[0].Equal(pki.Root) {
		t.Fatal("roots do not hold the root")
	}
	if err := leaf.VerifyHostname("ca.example"); err != nil {
		t.Error(err)
	}
	if err := leaf.VerifyHostname("127.0.0.1"); err != nil {
		t.Error(err)
	}
	if got, err := x509svid.IDFromCert(leaf); err != nil || got != id {
		t.Errorf("ID = %v, %v", got, err)
	}
	if !leaf.PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Error("issued for another key")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := iss.Issue(ctx, csrDER(t, key, nil), time.Hour); err == nil {
		t.Error("Issue with a cancelled context succeeded")
	}
}
