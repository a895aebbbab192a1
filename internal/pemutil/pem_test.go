package pemutil

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

func TestParsePrivateKeyReadsEveryEncodingCAToolingWrites(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sec1 := func(k *ecdsa.PrivateKey) []byte {
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	// `openssl ecparam -genkey` writes the curve's OID first.
	p256OID, err := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7})
	if err != nil {
		t.Fatal(err)
	}
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: p256OID})
	tests := []struct {
		name string
		data []byte
		want crypto.PublicKey
	}{
		{"pkcs8 ecdsa", pkcs8(t, ec), ec.Public()},
		{"pkcs8 rsa", pkcs8(t, rsaKey), rsaKey.Public()},
		{"pkcs8 ed25519", pkcs8(t, ed), ed.Public()},
		{"sec1", sec1(ec), ec.Public()},
		{"sec1 after openssl ec parameters", append(params, sec1(ec)...), ec.Public()},
		{"pkcs1", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}), rsaKey.Public()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParsePrivateKey(tt.data)
			if err != nil {
				t.Fatal(err)
			}
			if !k.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(tt.want) {
				t.Fatal("parsed key differs from the original")
			}
		})
	}
}

func TestParsePrivateKeyRefusesWithoutShowingTheKey(t *testing.T) {
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	truncated := der[:len(der)-5]
	flipped := append([]byte(nil), der...)
	flipped[0] = 0x31 // a SET where the SEQUENCE belongs
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"not PEM", []byte("hello"), "no PEM private key block found"},
		{"only EC parameters", pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{6, 1, 0}}), "no PEM private key block found"},
		{"encrypted pkcs8", pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: der}), "encrypted PKCS#8 private keys are not supported"},
		{"legacy encrypted", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Headers: map[string]string{"Proc-Type": "4,ENCRYPTED", "DEK-Info": "AES-128-CBC,00"}, Bytes: der}),
			"encrypted PEM private keys are not supported"},
		{"certificate instead of key", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), `unexpected PEM block type "CERTIFICATE", want a private key`},
		{"truncated pkcs8", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: truncated}), "parse PRIVATE KEY: "},
		{"corrupt pkcs8", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: flipped}), "parse PRIVATE KEY: "},
		{"pkcs8 as sec1", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), "parse EC PRIVATE KEY: "},
		{"pkcs8 as pkcs1", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: der}), "parse RSA PRIVATE KEY: "},
	}
	secret, err := ec.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, err := ParsePrivateKey(tt.data)
			if err == nil {
				t.Fatalf("parsed a %T", k)
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.want) {
				t.Fatalf("err = %q, want it to contain %q", msg, tt.want)
			}
			// No 8-byte window of the key, in any common spelling, may appear.
			for i := 0; i+8 <= len(secret); i++ {
				w := secret[i : i+8]
				for _, s := range []string{hex.EncodeToString(w), strings.ToUpper(hex.EncodeToString(w)), base64.StdEncoding.EncodeToString(w)[:8], string(w)} {
					if strings.Contains(msg, s) {
						t.Fatalf("error %q contains key material", msg)
					}
				}
			}
		})
	}
}

func TestParseCertificatesKeepsOrderAndNamesTheBadBlock(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	two := testpki.PEMCerts(ca.Intermediate, ca.Root)
	certs, err := ParseCertificates(append([]byte("# bundle\n"), two...))
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || !certs[0].Equal(ca.Intermediate) || !certs[1].Equal(ca.Root) {
		t.Fatalf("got %d certificates, want the intermediate then the root", len(certs))
	}
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "no PEM CERTIFICATE block found"},
		{"text only", []byte("not a certificate\n"), "no PEM CERTIFICATE block found"},
		{"key among certificates", append(testpki.PEMCerts(ca.Root), pkcs8(t, testpki.NewKey(t))...), `PEM block 2: unexpected type "PRIVATE KEY", want CERTIFICATE`},
		{"corrupt certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}), "PEM block 1: x509: "},
		{"junk after the last block", append(append([]byte{}, two...), "junk\n"...), "4 bytes of non-PEM data after PEM block 2"},
		{"truncated last block", two[:len(two)-40], "non-PEM data after PEM block 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseCertificates(tt.data); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestParsePrivateKeyRefusesJunkAfterTheLastBlock(t *testing.T) {
	key := pkcs8(t, testpki.NewKey(t))
	if _, err := ParsePrivateKey(append(append([]byte{}, key...), "\n\n"...)); err != nil {
		t.Fatalf("trailing blank lines: %v", err)
	}
	_, err := ParsePrivateKey(append(append([]byte{}, key...), "appended"...))
	if err == nil || !strings.Contains(err.Error(), "8 bytes of non-PEM data after PEM block 1") {
		t.Fatalf("err = %v, want a refusal of the trailing data", err)
	}
}

func pkcs8(t *testing.T, k any) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}
