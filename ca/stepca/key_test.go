package stepca_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"

	"github.com/meshproxy/meshproxy/ca/stepca"
	"github.com/meshproxy/meshproxy/ca/stepca/stepcatest"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TestProvisionerKeyForms: the key is accepted in every form step keeps it,
// and refused with a reason otherwise.
func TestProvisionerKeyForms(t *testing.T) {
	ec := &jose.JSONWebKey{Key: testpki.NewKey(t), KeyID: "kid-1"}
	plain, err := json.Marshal(ec)
	if err != nil {
		t.Fatal(err)
	}
	password := []byte("correct horse")
	compact, err := stepcatest.EncryptKey(ec, password, 4096)
	if err != nil {
		t.Fatal(err)
	}
	jwe, err := jose.ParseEncryptedCompact(compact, []jose.KeyAlgorithm{jose.PBES2_HS256_A128KW}, []jose.ContentEncryption{jose.A256GCM})
	if err != nil {
		t.Fatal(err)
	}
	full := jwe.FullSerialize() // what `step crypto jwk create` writes
	public, err := json.Marshal(ec.Public())
	if err != nil {
		t.Fatal(err)
	}
	_, edPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ed, err := json.Marshal(&jose.JSONWebKey{Key: edPriv})
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name     string
		data     string
		password []byte
		wantAlg  string
		wantErr  string
		wantIs   error
	}{
		{name: "plain JWK", data: string(plain), wantAlg: "ES256"},
		{name: "compact JWE (ca.json encryptedKey)", data: compact + "\n", password: password, wantAlg: "ES256"},
		{name: "JSON JWE (step crypto jwk create)", data: full, password: password, wantAlg: "ES256"},
		{name: "Ed25519 JWK gets EdDSA and a thumbprint kid", data: string(ed), wantAlg: "EdDSA"},
		{name: "encrypted without password", data: compact, wantIs: stepca.ErrKeyEncrypted},
		{name: "wrong password", data: compact, password: []byte("wrong"), wantErr: "wrong password"},
		{name: "public key only", data: string(public), wantErr: "public key"},
		{name: "symmetric key", data: `{"kty":"oct","k":"AAAA"}`, wantErr: "invalid JWK"},
		{name: "garbage", data: "hello", wantErr: "parse JWK"},
		{name: "empty", data: "  \n", wantErr: "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key, err := stepca.ParseProvisionerKey([]byte(tt.data), tt.password)
			switch {
			case tt.wantIs != nil:
				if !errors.Is(err, tt.wantIs) {
					t.Fatalf("err = %v, want %v", err, tt.wantIs)
				}
				return
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			case err != nil:
				t.Fatal(err)
			}
			if key.Algorithm != tt.wantAlg || key.KeyID == "" || key.IsPublic() {
				t.Fatalf("alg %q kid %q public %v", key.Algorithm, key.KeyID, key.IsPublic())
			}
			if _, ok := key.Key.(*ecdsa.PrivateKey); ok && key.KeyID != "kid-1" {
				t.Errorf("kid %q, want the file's", key.KeyID)
			}
		})
	}
}

func TestLoadProvisionerKeyTrimsPasswordFile(t *testing.T) {
	dir := t.TempDir()
	key := &jose.JSONWebKey{Key: testpki.NewKey(t)}
	enc, err := stepcatest.EncryptKey(key, []byte("pw"), 4096)
	if err != nil {
		t.Fatal(err)
	}
	keyFile, pwFile := filepath.Join(dir, "key.jwe"), filepath.Join(dir, "pw")
	if err := os.WriteFile(keyFile, []byte(enc), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte("pw\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := stepca.LoadProvisionerKey(keyFile, pwFile); err != nil {
		t.Fatal(err)
	}
	if _, err := stepca.LoadProvisionerKey(filepath.Join(dir, "missing"), ""); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("missing file: %v", err)
	}
}

func TestNewValidatesURL(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	key := &jose.JSONWebKey{Key: testpki.NewKey(t), KeyID: "k"}
	for _, u := range []string{"http://ca:9000", "https://", "ca:9000", "https://user@ca:9000", "https://ca:9000/?x=1"} {
		if _, err := stepca.New(u, pki.Bundle().X509Authorities(), "p", key); err == nil {
			t.Errorf("%q accepted", u)
		}
	}
	s, err := stepca.New("https://ca.internal:9000", pki.Bundle().X509Authorities(), "p", key)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := stepca.New("https://ca:9000", nil, "p", key); err == nil {
		t.Error("no roots accepted")
	}
	pub := key.Public()
	if _, err := stepca.New("https://ca:9000", pki.Bundle().X509Authorities(), "p", &pub); err == nil {
		t.Error("public key accepted")
	}
}
