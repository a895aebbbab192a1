package tlsmgr

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestVerifySVIDRules(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	other := testpki.New(t, "cluster.local")
	key := testpki.NewKey(t)
	id := "spiffe://cluster.local/ns/default/sa/web"
	uri := func(s string) *url.URL { u, _ := url.Parse(s); return u }
	now := time.Now()

	tests := []struct {
		name    string
		issuer  *testpki.CA
		pub     crypto.PublicKey
		edit    func(*x509.Certificate)
		td      string
		at      time.Time
		wantErr string
		wantIs  error
	}{
		{name: "valid svid"},
		{name: "valid svid in the required trust domain", td: "cluster.local"},
		{name: "key of another certificate", pub: testpki.NewKey(t).Public(), wantIs: ErrKeyMismatch},
		{name: "no uri san", edit: func(c *x509.Certificate) { c.URIs = nil }, wantIs: ErrNoSPIFFEID, wantErr: "no URI SAN"},
		{name: "two uri sans", edit: func(c *x509.Certificate) {
			c.URIs = append(c.URIs, uri("spiffe://cluster.local/ns/default/sa/other"))
		}, wantIs: ErrNoSPIFFEID, wantErr: "more than one URI SAN"},
		{name: "uri san that is not spiffe", edit: func(c *x509.Certificate) { c.URIs = []*url.URL{uri("https://example.com/x")} }, wantIs: ErrNoSPIFFEID},
		{name: "trust domain id without path", edit: func(c *x509.Certificate) { c.URIs = []*url.URL{uri("spiffe://cluster.local")} }, wantIs: ErrNoSPIFFEID},
		{name: "other trust domain", td: "example.org", wantErr: "not in trust domain example.org"},
		{name: "signed by an untrusted ca", issuer: other, wantErr: "verify chain"},
		{name: "expired", at: now.Add(2 * time.Hour), wantIs: ErrExpired, wantErr: "expired at"},
		{name: "not yet valid", at: now.Add(-time.Hour), wantIs: ErrExpired, wantErr: "not valid before"},
		{name: "ca certificate as leaf", edit: func(c *x509.Certificate) {
			c.IsCA = true
			c.KeyUsage |= x509.KeyUsageCertSign
		}, wantErr: "CA flag"},
		{name: "no digitalSignature usage", edit: func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageKeyEncipherment }, wantErr: "digitalSignature"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			issuer := ca
			if tt.issuer != nil {
				issuer = tt.issuer
			}
			pub := tt.pub
			if pub == nil {
				pub = key.Public()
			}
			leaf := signLeaf(t, issuer, pub, func(c *x509.Certificate) {
				c.URIs = []*url.URL{uri(id)}
				if tt.edit != nil {
					tt.edit(c)
				}
			})
			var td spiffeid.TrustDomain
			if tt.td != "" {
				td = spiffeid.RequireTrustDomainFromString(tt.td)
			}
			at := tt.at
			if at.IsZero() {
				at = now
			}
			svid, err := verifySVID([]*x509.Certificate{leaf, issuer.Intermediate}, key, ca.Bundle(), td, at)
			if tt.wantErr == "" && tt.wantIs == nil {
				if err != nil {
					t.Fatalf("verifySVID: %v", err)
				}
				if svid.ID.String() != id {
					t.Fatalf("id = %s, want %s", svid.ID, id)
				}
				return
			}
			if err == nil {
				t.Fatal("verifySVID accepted a bad SVID")
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Errorf("error %q is not %v", err, tt.wantIs)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
		})
	}
}

func TestParsePrivateKeyPEMFormats(t *testing.T) {
	ec := testpki.NewKey(t)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8 := func(k any) []byte {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	sec1, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
	tests := []struct {
		name    string
		data    []byte
		want    crypto.PublicKey
		wantErr string
	}{
		{name: "pkcs8 ecdsa", data: pkcs8(ec), want: ec.Public()},
		{name: "pkcs8 rsa", data: pkcs8(rsaKey), want: rsaKey.Public()},
		{name: "sec1 ecdsa", data: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}), want: ec.Public()},
		{name: "sec1 after openssl ec parameters", data: append(params, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1})...), want: ec.Public()},
		{name: "pkcs1 rsa", data: pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), want: rsaKey.Public()},
		{name: "encrypted", data: pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}}), wantErr: "encrypted"},
		{name: "certificate instead of key", data: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), wantErr: `"CERTIFICATE"`},
		{name: "corrupt pkcs8", data: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}), wantErr: "parse PRIVATE KEY"},
		{name: "not pem", data: []byte("hello"), wantErr: "no PEM private key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParsePrivateKeyPEM(tt.data)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !k.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(tt.want) {
				t.Fatal("parsed key differs from the original")
			}
		})
	}
}

func TestParseCertificatesPEM(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	two := testpki.PEMCerts(ca.Intermediate, ca.Root)
	tests := []struct {
		name    string
		data    []byte
		want    int
		wantErr string
	}{
		{name: "two certificates in order", data: two, want: 2},
		{name: "text around blocks is ignored", data: append([]byte("# bundle\n"), two...), want: 2},
		{name: "empty", data: nil, wantErr: "no PEM CERTIFICATE"},
		{name: "key block among certificates", data: append(testpki.PEMCerts(ca.Root), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}})...), wantErr: "PEM block 2"},
		{name: "corrupt certificate", data: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}), wantErr: "PEM block 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certs, err := ParseCertificatesPEM(tt.data)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to mention %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(certs) != tt.want || !certs[0].Equal(ca.Intermediate) {
				t.Fatalf("got %d certs, want %d starting with the intermediate", len(certs), tt.want)
			}
		})
	}
}

func TestRenewTimeIsHalfLifeWithinJitter(t *testing.T) {
	nb := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	leafFor := func(notBefore time.Time, life time.Duration) *identity {
		return &identity{svid: svidWithLeaf(&x509.Certificate{NotBefore: notBefore, NotAfter: notBefore.Add(life)})}
	}
	tests := []struct {
		name     string
		id       *identity
		fraction float64
		jitter   float64
		j        float64
		want     time.Time
	}{
		{name: "half of a day", id: leafFor(nb, 24*time.Hour), fraction: 0.5, jitter: 0.01, j: 0, want: nb.Add(12 * time.Hour)},
		{name: "earliest jitter", id: leafFor(nb, 24*time.Hour), fraction: 0.5, jitter: 0.01, j: -1, want: nb.Add(12*time.Hour - 864*time.Second)},
		{name: "latest jitter", id: leafFor(nb, 24*time.Hour), fraction: 0.5, jitter: 0.01, j: 1, want: nb.Add(12*time.Hour + 864*time.Second)},
		{name: "custom fraction", id: leafFor(nb, 10*time.Hour), fraction: 0.8, jitter: 0, j: 1, want: nb.Add(8 * time.Hour)},
		{
			// The CA back-dates NotBefore two minutes: count from receipt.
			name: "back-dated short certificate counts from receipt",
			id: func() *identity {
				id := leafFor(nb.Add(-2*time.Minute), 2*time.Minute+4*time.Second)
				id.loadedAt = nb
				return id
			}(),
			fraction: 0.5, jitter: 0, want: nb.Add(2 * time.Second),
		},
		{name: "already expired renews at once", id: leafFor(nb, -time.Second), fraction: 0.5, jitter: 0.01, want: nb},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := options{renewFraction: tt.fraction, jitter: tt.jitter}
			if got := o.renewTime(tt.id, tt.j); !got.Equal(tt.want) {
				t.Fatalf("renewTime = %s, want %s", got, tt.want)
			}
		})
	}
}

func TestBackoffDoublesCapsAndJitters(t *testing.T) {
	const lo, hi = 500 * time.Millisecond, 60 * time.Second
	tests := []struct {
		failures int
		u        float64
		want     time.Duration
	}{
		{failures: 1, u: 0.999999999, want: lo},
		{failures: 1, u: 0, want: lo / 2},
		{failures: 2, u: 0.999999999, want: time.Second},
		{failures: 4, u: 0.999999999, want: 4 * time.Second},
		{failures: 8, u: 0.999999999, want: hi},
		{failures: 8, u: 0, want: hi / 2},
		{failures: 500, u: 0.999999999, want: hi},
		{failures: 0, u: 0.999999999, want: lo},
	}
	for _, tt := range tests {
		got := backoff(lo, hi, tt.failures, tt.u)
		// u < 1 leaves the result a hair under d; allow a microsecond.
		if got > tt.want || tt.want-got > time.Microsecond {
			t.Errorf("backoff(failures=%d, u=%g) = %s, want %s", tt.failures, tt.u, got, tt.want)
		}
	}
}

func TestOptionsRejectNonsense(t *testing.T) {
	tests := []struct {
		name string
		opt  Option
		want string
	}{
		{"zero ttl", WithTTL(0), "ttl"},
		{"ttl over 90 days", WithTTL(91 * 24 * time.Hour), "ttl"},
		{"renew fraction 1", WithRenewFraction(1), "renew fraction"},
		{"negative jitter", WithJitter(-0.1), "jitter"},
		{"jitter past expiry", WithJitter(0.6), "jitter"},
		{"backoff max below min", WithBackoff(time.Second, time.Millisecond), "backoff"},
		{"nil clock", WithClock(nil), "clock"},
		{"id outside trust domain", func(o *options) {
			o.trustDomain = spiffeid.RequireTrustDomainFromString("example.org")
			o.id = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
		}, "not in trust domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewRotator(issuerFunc(nil), tt.opt)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewRotator err = %v, want it to mention %q", err, tt.want)
			}
		})
	}
}
