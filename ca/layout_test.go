package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var clusterLocal = spiffeid.RequireTrustDomainFromString("cluster.local")

func TestInitWritesIstioLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	td := spiffeid.RequireTrustDomainFromString("example.org")
	if err := Init(dir, td, WithRootTTL(1000*time.Hour), WithCATTL(100*time.Hour)); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s mode = %v, want 0600", CAKeyFile, fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 4 {
		t.Fatalf("dir holds %d entries, want exactly the 4 layout files (no root key, no temporaries)", len(entries))
	}
	roots, err := parseCertsPEM(readFile(t, filepath.Join(dir, RootCertFile)))
	if err != nil || len(roots) != 1 {
		t.Fatalf("root-cert.pem: %d certs, %v", len(roots), err)
	}
	caCerts, err := parseCertsPEM(readFile(t, filepath.Join(dir, CACertFile)))
	if err != nil || len(caCerts) != 1 {
		t.Fatalf("ca-cert.pem: %v", err)
	}
	chain, err := parseCertsPEM(readFile(t, filepath.Join(dir, CertChainFile)))
	if err != nil || len(chain) != 2 || !chain[0].Equal(caCerts[0]) || !chain[1].Equal(roots[0]) {
		t.Fatalf("cert-chain.pem must be ca-cert then root: %v", err)
	}
	root, inter := roots[0], caCerts[0]
	for _, c := range []*x509.Certificate{root, inter} {
		if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://example.org" {
			t.Errorf("%s URIs = %v, want spiffe://example.org", c.Subject.CommonName, c.URIs)
		}
		if !c.IsCA {
			t.Errorf("%s is not a CA", c.Subject.CommonName)
		}
	}
	if d := root.NotAfter.Sub(root.NotBefore); d != 1000*time.Hour+ClockSkew {
		t.Errorf("root lifetime = %v", d)
	}
	if d := inter.NotAfter.Sub(inter.NotBefore); d != 100*time.Hour+ClockSkew {
		t.Errorf("ca lifetime = %v", d)
	}
	if inter.MaxPathLen != 0 || !inter.MaxPathLenZero {
		t.Error("intermediate may sign further CAs")
	}

	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if a.TrustDomain() != td {
		t.Fatalf("trust domain = %v", a.TrustDomain())
	}
	if !a.NotAfter().Equal(inter.NotAfter) || !a.RootsNotAfter().Equal(root.NotAfter) {
		t.Fatalf("expiries = %v / %v", a.NotAfter(), a.RootsNotAfter())
	}
	id := spiffeid.RequireFromString("spiffe://example.org/ns/a/sa/b")
	leaf, err := a.Sign(csrDER(t, p256(t), nil), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got, _, err := x509svid.Verify(append([]*x509.Certificate{leaf}, a.Chain()...), a.Bundle()); err != nil || got != id {
		t.Fatalf("issued certificate does not verify against the bundle: %v", err)
	}
}

func TestInitRefusesOverwriteWithoutForce(t *testing.T) {
	dir := t.TempDir()
	if err := Init(dir, clusterLocal); err != nil {
		t.Fatal(err)
	}
	before := readFile(t, filepath.Join(dir, RootCertFile))
	beforeKey := readFile(t, filepath.Join(dir, CAKeyFile))
	err := Init(dir, clusterLocal)
	if !errors.Is(err, ErrExists) {
		t.Fatalf("err = %v, want ErrExists", err)
	}
	if !bytes.Equal(before, readFile(t, filepath.Join(dir, RootCertFile))) || !bytes.Equal(beforeKey, readFile(t, filepath.Join(dir, CAKeyFile))) {
		t.Fatal("refused init changed the files")
	}
	// One stray file of the layout is enough to refuse.
	other := t.TempDir()
	writeFile(t, filepath.Join(other, CAKeyFile), []byte("precious"))
	if err := Init(other, clusterLocal); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), CAKeyFile) {
		t.Fatalf("err = %v, want ErrExists naming %s", err, CAKeyFile)
	}
	// With force, the CA is replaced and the key is still 0600.
	if err := os.Chmod(filepath.Join(dir, CAKeyFile), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Init(dir, clusterLocal, WithForce(true)); err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(before, readFile(t, filepath.Join(dir, RootCertFile))) {
		t.Fatal("forced init kept the old root")
	}
	if fi, _ := os.Stat(filepath.Join(dir, CAKeyFile)); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key mode after force = %v", fi.Mode().Perm())
	}
	if _, err := Load(dir); err != nil {
		t.Fatal(err)
	}
}

func TestInitKeyTypesAndValidation(t *testing.T) {
	for _, kt := range []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048} {
		t.Run(string(kt), func(t *testing.T) {
			dir := t.TempDir()
			if err := Init(dir, clusterLocal, WithKeyType(kt)); err != nil {
				t.Fatal(err)
			}
			a, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := a.Sign(csrDER(t, p256(t), nil), spiffeid.RequireFromString("spiffe://cluster.local/x"), 0); err != nil {
				t.Fatal(err)
			}
		})
	}
	if _, err := ParseKeyType("dsa-1024"); err == nil {
		t.Error("unknown key type accepted")
	}
	if err := Init(t.TempDir(), clusterLocal, WithRootTTL(time.Hour), WithCATTL(2*time.Hour)); err == nil {
		t.Error("intermediate outliving its root accepted")
	}
	if err := Init(t.TempDir(), clusterLocal, WithCATTL(0)); err == nil {
		t.Error("zero ttl accepted")
	}
}

// foreignCA writes a CA directory the way other tooling does: keys in the
// given PEM encoding, certificates maybe without SPIFFE URI SANs.
type foreignCA struct {
	root, inter *x509.Certificate
	rootKey     crypto.Signer
	interKey    crypto.Signer
}

func newForeignCA(t *testing.T, rootKey, interKey crypto.Signer, uri string) *foreignCA {
	t.Helper()
	rt := caTemplate("Root CA")
	it := caTemplate("Intermediate CA")
	if uri != "" {
		u, _ := url.Parse(uri)
		rt.URIs, it.URIs = []*url.URL{u}, []*url.URL{u}
	}
	root := mkCert(t, rt, nil, rootKey.Public(), rootKey)
	inter := mkCert(t, it, root, interKey.Public(), rootKey)
	return &foreignCA{root: root, inter: inter, rootKey: rootKey, interKey: interKey}
}

func pemKey(t *testing.T, encoding string, key crypto.Signer) []byte {
	t.Helper()
	switch encoding {
	case "pkcs8":
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	case "pkcs1":
		return pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key.(*rsa.PrivateKey))})
	case "sec1":
		der, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
		if err != nil {
			t.Fatal(err)
		}
		// openssl ecparam -genkey writes the curve parameters first.
		params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
		return append(params, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})...)
	}
	t.Fatalf("unknown encoding %s", encoding)
	return nil
}

func TestLoadDirectoriesMadeByOtherTooling(t *testing.T) {
	rsaKey := func() crypto.Signer {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	ecKey := func() crypto.Signer { return p256(t) }
	const opensslText = "Certificate:\n    Data:\n        Version: 3 (0x2)\n" // `openssl x509 -text` output before the PEM

	tests := []struct {
		name      string
		rootKey   crypto.Signer
		interKey  crypto.Signer
		encoding  string
		uri       string
		opts      []Option
		chain     func(ca *foreignCA) []byte // cert-chain.pem; nil: no file
		wantTD    string
		wantFrom  TrustDomainOrigin // checked if set
		wantError string
	}{
		{
			name: "openssl RSA with PKCS#1 key, chain with root", rootKey: rsaKey(), interKey: rsaKey(), encoding: "pkcs1",
			uri: "spiffe://cluster.local", wantTD: "cluster.local",
			chain: func(ca *foreignCA) []byte { return certsPEM(ca.inter, ca.root) },
		},
		{
			name: "PKCS#8 key, chain without root", rootKey: ecKey(), interKey: ecKey(), encoding: "pkcs8",
			uri: "spiffe://cluster.local", wantTD: "cluster.local",
			chain: func(ca *foreignCA) []byte { return certsPEM(ca.inter) },
		},
		{
			name: "SEC1 key after EC PARAMETERS, no cert-chain.pem", rootKey: ecKey(), interKey: ecKey(), encoding: "sec1",
			uri: "spiffe://cluster.local/ns/istio-system/sa/citadel", wantTD: "cluster.local",
		},
		{
			name: "certs without SPIFFE SAN take the given trust domain", rootKey: ecKey(), interKey: ecKey(), encoding: "pkcs8",
			opts: []Option{WithTrustDomain(spiffeid.RequireTrustDomainFromString("mesh.example"))}, wantTD: "mesh.example", wantFrom: TrustDomainFromOption,
			chain: func(ca *foreignCA) []byte { return append([]byte(opensslText), certsPEM(ca.inter, ca.root)...) },
		},
		{
			// Istio's tools/certs: the intermediate has only a DNS SAN; istiod
			// then uses cluster.local, and so does the CA.
			name: "certs without SPIFFE SAN and no trust domain take cluster.local", rootKey: ecKey(), interKey: ecKey(), encoding: "pkcs8",
			wantTD: "cluster.local", wantFrom: TrustDomainFromDefault,
		},
		{
			name: "trust domain disagreeing with the SAN", rootKey: ecKey(), interKey: ecKey(), encoding: "pkcs8",
			uri: "spiffe://cluster.local", opts: []Option{WithTrustDomain(spiffeid.RequireTrustDomainFromString("other.org"))},
			wantError: `trust domain "cluster.local", not "other.org"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ca := newForeignCA(t, tt.rootKey, tt.interKey, tt.uri)
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, RootCertFile), certsPEM(ca.root))
			writeFile(t, filepath.Join(dir, CACertFile), certsPEM(ca.inter))
			writeFile(t, filepath.Join(dir, CAKeyFile), pemKey(t, tt.encoding, ca.interKey))
			if tt.chain != nil {
				writeFile(t, filepath.Join(dir, CertChainFile), tt.chain(ca))
			}
			a, err := Load(dir, tt.opts...)
			if tt.wantError != "" {
				if !errors.Is(err, ErrInvalidCA) || !strings.Contains(err.Error(), tt.wantError) {
					t.Fatalf("err = %v, want ErrInvalidCA mentioning %q", err, tt.wantError)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if a.TrustDomain().Name() != tt.wantTD {
				t.Fatalf("trust domain = %s, want %s", a.TrustDomain(), tt.wantTD)
			}
			if tt.wantFrom != "" && a.TrustDomainFrom() != tt.wantFrom {
				t.Fatalf("trust domain from %q, want %q", a.TrustDomainFrom(), tt.wantFrom)
			}
			if c := a.Chain(); len(c) != 1 || !c[0].Equal(ca.inter) {
				t.Fatalf("chain = %d certs, want just the intermediate", len(c))
			}
			leaf, err := a.Sign(csrDER(t, p256(t), nil), spiffeid.RequireFromString("spiffe://"+tt.wantTD+"/ns/a/sa/b"), 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := leaf.CheckSignatureFrom(ca.inter); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestLoadMultiRootBundle(t *testing.T) {
	// Root rotation: root-cert.pem holds the new root and the old one; the
	// signing cert chains to the old one.
	oldCA := newForeignCA(t, p256(t), p256(t), "spiffe://cluster.local")
	newRootKey := p256(t)
	newRoot := mkCert(t, caTemplate("New Root"), nil, newRootKey.Public(), newRootKey)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, RootCertFile), certsPEM(newRoot, oldCA.root))
	writeFile(t, filepath.Join(dir, CACertFile), certsPEM(oldCA.inter))
	writeFile(t, filepath.Join(dir, CAKeyFile), pemKey(t, "pkcs8", oldCA.interKey))
	writeFile(t, filepath.Join(dir, CertChainFile), certsPEM(oldCA.inter, oldCA.root))
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	roots := a.Roots()
	if len(roots) != 2 || !roots[0].Equal(oldCA.root) || !roots[1].Equal(newRoot) {
		t.Fatalf("roots = %d, want the chain's own root first, then the other", len(roots))
	}
	if len(a.Bundle().X509Authorities()) != 2 {
		t.Fatal("bundle lacks a root")
	}
}

func TestLoadMultiLevelChain(t *testing.T) {
	rootKey, midKey, sigKey := p256(t), p256(t), p256(t)
	u, _ := url.Parse("spiffe://cluster.local")
	rt := caTemplate("root")
	rt.URIs = []*url.URL{u}
	root := mkCert(t, rt, nil, rootKey.Public(), rootKey)
	mid := mkCert(t, caTemplate("mid"), root, midKey.Public(), rootKey)
	st := caTemplate("signing")
	st.NotAfter = time.Now().Add(10 * time.Hour)
	sig := mkCert(t, st, mid, sigKey.Public(), midKey)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, RootCertFile), certsPEM(root))
	writeFile(t, filepath.Join(dir, CACertFile), certsPEM(sig))
	writeFile(t, filepath.Join(dir, CAKeyFile), pemKey(t, "pkcs8", sigKey))
	writeFile(t, filepath.Join(dir, CertChainFile), certsPEM(sig, mid, root))
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if c := a.Chain(); len(c) != 2 || !c[0].Equal(sig) || !c[1].Equal(mid) {
		t.Fatalf("chain = %d certs, want signing, mid", len(c))
	}
	if !a.NotAfter().Equal(sig.NotAfter) {
		t.Fatalf("NotAfter = %v, want the earliest in the chain %v", a.NotAfter(), sig.NotAfter)
	}
}

func TestLoadRejectsInconsistentCA(t *testing.T) {
	good := newForeignCA(t, p256(t), p256(t), "spiffe://cluster.local")
	other := newForeignCA(t, p256(t), p256(t), "spiffe://cluster.local")
	leafKey := p256(t)
	notCA := mkCert(t, &x509.Certificate{KeyUsage: x509.KeyUsageDigitalSignature, URIs: good.inter.URIs}, good.root, leafKey.Public(), good.rootKey)
	noSign := caTemplate("no certsign")
	noSign.KeyUsage = x509.KeyUsageDigitalSignature
	noSignKey := p256(t)
	noSignCert := mkCert(t, noSign, good.root, noSignKey.Public(), good.rootKey)
	expT := caTemplate("expired")
	expT.NotBefore, expT.NotAfter = time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)
	expKey := p256(t)
	expired := mkCert(t, expT, good.root, expKey.Public(), good.rootKey)

	tests := []struct {
		name  string
		files map[string][]byte
		want  string
	}{
		{"key does not match cert", map[string][]byte{CACertFile: certsPEM(good.inter), CAKeyFile: pemKey(t, "pkcs8", other.interKey)}, "does not match"},
		{"ca cert is a leaf", map[string][]byte{CACertFile: certsPEM(notCA), CAKeyFile: pemKey(t, "pkcs8", leafKey)}, "not a CA"},
		{"ca cert lacks keyCertSign", map[string][]byte{CACertFile: certsPEM(noSignCert), CAKeyFile: pemKey(t, "pkcs8", noSignKey)}, "keyCertSign"},
		{"does not chain to the roots", map[string][]byte{CACertFile: certsPEM(other.inter), CAKeyFile: pemKey(t, "pkcs8", other.interKey)}, "does not chain"},
		{"expired ca cert", map[string][]byte{CACertFile: certsPEM(expired), CAKeyFile: pemKey(t, "pkcs8", expKey)}, "expired"},
		{"root is not a CA", map[string][]byte{RootCertFile: certsPEM(good.root, notCA)}, "root 2"},
		{"garbage key", map[string][]byte{CAKeyFile: []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")}, CAKeyFile},
		{"encrypted key", map[string][]byte{CAKeyFile: pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}})}, "encrypted"},
		{"key file holds a certificate", map[string][]byte{CAKeyFile: certsPEM(good.root)}, CAKeyFile},
		{"empty root file", map[string][]byte{RootCertFile: []byte("\n")}, RootCertFile},
		{"missing key file", map[string][]byte{CAKeyFile: nil}, CAKeyFile},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			files := map[string][]byte{
				RootCertFile: certsPEM(good.root),
				CACertFile:   certsPEM(good.inter),
				CAKeyFile:    pemKey(t, "pkcs8", good.interKey),
			}
			for k, v := range tt.files {
				files[k] = v
			}
			for name, data := range files {
				if data != nil {
					writeFile(t, filepath.Join(dir, name), data)
				}
			}
			_, err := Load(dir)
			if !errors.Is(err, ErrInvalidCA) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalidCA mentioning %q", err, tt.want)
			}
		})
	}
}

func TestParseKeyPEMRejectsUnsupportedCAKeys(t *testing.T) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parseKeyPEM(pemKey(t, "pkcs8", k)); err != nil {
		t.Fatal(err)
	}
	if _, err := parseKeyPEM([]byte("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n")); err == nil || !strings.Contains(err.Error(), "encrypted") {
		t.Fatalf("legacy encrypted key: %v", err)
	}
}
