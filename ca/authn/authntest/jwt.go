package authntest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"encoding/json"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// Issuer signs Kubernetes-style service account JWTs.
type Issuer struct {
	Name  string // the iss claim
	KeyID string
	Alg   jose.SignatureAlgorithm
	key   crypto.Signer
}

// NewIssuer makes an issuer with a fresh key: alg RS256 (RSA-2048) or ES256.
func NewIssuer(t testing.TB, name string, alg jose.SignatureAlgorithm) *Issuer {
	t.Helper()
	var (
		key crypto.Signer
		err error
	)
	switch alg {
	case jose.RS256:
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	case jose.ES256:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		t.Fatalf("authntest: unsupported alg %s", alg)
	}
	if err != nil {
		t.Fatalf("authntest: key: %v", err)
	}
	return &Issuer{Name: name, KeyID: randHex(t, 8), Alg: alg, key: key}
}

// JWK is the issuer's public key.
func (i *Issuer) JWK() jose.JSONWebKey {
	return jose.JSONWebKey{Key: i.key.Public(), KeyID: i.KeyID, Algorithm: string(i.Alg), Use: "sig"}
}

// JWKS encodes the public keys of issuers as a JSON Web Key Set.
func JWKS(t testing.TB, issuers ...*Issuer) []byte {
	t.Helper()
	var set jose.JSONWebKeySet
	for _, i := range issuers {
		set.Keys = append(set.Keys, i.JWK())
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatalf("authntest: jwks: %v", err)
	}
	return b
}

// Token describes a service account token; zero fields take defaults.
type Token struct {
	Namespace, ServiceAccount string
	Audience                  []string  // default ["istio-ca"]
	Issuer                    string    // default the issuer's Name
	Expiry                    time.Time // default in an hour
	NotBefore                 time.Time // default a minute ago
	Subject                   string    // default system:serviceaccount:NS:SA
	NoKubernetesClaim         bool
}

// Sign returns the compact JWT for tok.
func (i *Issuer) Sign(t testing.TB, tok Token) string {
	t.Helper()
	now := time.Now()
	if tok.Audience == nil {
		tok.Audience = []string{"istio-ca"}
	}
	if tok.Issuer == "" {
		tok.Issuer = i.Name
	}
	if tok.Expiry.IsZero() {
		tok.Expiry = now.Add(time.Hour)
	}
	if tok.NotBefore.IsZero() {
		tok.NotBefore = now.Add(-time.Minute)
	}
	if tok.Subject == "" {
		tok.Subject = "system:serviceaccount:" + tok.Namespace + ":" + tok.ServiceAccount
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: i.Alg, Key: jose.JSONWebKey{Key: i.key, KeyID: i.KeyID}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatalf("authntest: signer: %v", err)
	}
	claims := jwt.Claims{
		Issuer: tok.Issuer, Subject: tok.Subject, Audience: tok.Audience,
		Expiry: jwt.NewNumericDate(tok.Expiry), NotBefore: jwt.NewNumericDate(tok.NotBefore),
		IssuedAt: jwt.NewNumericDate(tok.NotBefore),
	}
	b := jwt.Signed(signer).Claims(claims)
	if !tok.NoKubernetesClaim {
		b = b.Claims(map[string]any{"kubernetes.io": map[string]any{
			"namespace":      tok.Namespace,
			"pod":            map[string]any{"name": tok.ServiceAccount + "-pod", "uid": randHex(t, 8)},
			"serviceaccount": map[string]any{"name": tok.ServiceAccount, "uid": randHex(t, 8)},
		}})
	}
	s, err := b.Serialize()
	if err != nil {
		t.Fatalf("authntest: sign jwt: %v", err)
	}
	return s
}

func randHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatalf("authntest: rand: %v", err)
	}
	return hex.EncodeToString(b)
}

func randHexNoT() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
