package authn

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	josejson "github.com/go-jose/go-jose/v4/json"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// FuzzTokensFile feeds arbitrary bytes as the static tokens file. Errors
// name the file and never quote a token; a file that loads maps every
// "TOKEN SPIFFE-ID" line's token to that line's identity and nothing else.
// Seeds: testdata/fuzz/FuzzTokensFile.
func FuzzTokensFile(f *testing.F) {
	path := filepath.Join(f.TempDir(), "tokens")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		lines := tokenLines(data)
		toks, err := NewTokens(path, WithLogger(quietLogger()))
		if err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %q", err)
			}
			for _, l := range lines {
				// A token long enough to be a secret, written once, must not be echoed.
				if len(l[0]) >= 12 && bytes.Count(data, []byte(l[0])) == 1 && strings.Contains(err.Error(), l[0]) {
					t.Fatalf("error quotes the token %q: %v", l[0], err)
				}
			}
			return
		}
		if toks.Len() != len(lines) {
			t.Fatalf("loaded %d tokens from %d token lines", toks.Len(), len(lines))
		}
		for _, l := range lines {
			id, err := toks.Authenticate(context.Background(), Caller{Token: l[0]})
			if err != nil || id.String() != spiffeid.RequireFromString(l[1]).String() {
				t.Fatalf("token of line %q authenticates as %v, %v", l, id, err)
			}
		}
		if _, err := toks.Authenticate(context.Background(), Caller{Token: "\x00not-a-listed-token"}); !errors.Is(err, ErrUnauthenticated) {
			t.Fatalf("unlisted token: %v", err)
		}
	})
}

// tokenLines returns the [token, id] of every line of a tokens file that
// carries one: two fields, optionally followed by a '#' comment.
func tokenLines(data []byte) [][2]string {
	var out [][2]string
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, maxTokenFileSize)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || strings.HasPrefix(fields[0], "#") || (len(fields) > 2 && !strings.HasPrefix(fields[2], "#")) {
			continue
		}
		out = append(out, [2]string{fields[0], fields[1]})
	}
	return out
}

// FuzzJWT hands arbitrary bearer tokens to the JWKS authenticator. Nothing
// but a JWT signed by a key of the set may pass, so every input is refused,
// as Unauthenticated or PermissionDenied, and nothing panics.
// Seeds: testdata/fuzz/FuzzJWT.
func FuzzJWT(f *testing.F) {
	j, _ := fuzzJWKS(f)
	f.Fuzz(func(t *testing.T, token string) {
		id, err := j.Authenticate(context.Background(), Caller{Token: token})
		if err == nil {
			t.Fatalf("unsigned input %q authenticated as %s", token, id)
		}
		if !errors.Is(err, ErrUnauthenticated) && !errors.Is(err, ErrPermissionDenied) {
			t.Fatalf("refusal is neither Unauthenticated nor PermissionDenied: %v", err)
		}
	})
}

// FuzzJWTClaims signs arbitrary claims with a key of the set, so the fuzzer
// reaches claim validation. A token is accepted only if its issuer is the
// cluster's, "istio-ca" is among its audiences, it carries an unexpired exp
// and is already valid, and the identity is the service account its claims
// name. Seeds: testdata/fuzz/FuzzJWTClaims.
func FuzzJWTClaims(f *testing.F) {
	j, key := fuzzJWKS(f)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, claims []byte) {
		obj, err := signer.Sign(claims)
		if err != nil {
			t.Fatal(err)
		}
		token, err := obj.CompactSerialize()
		if err != nil {
			t.Fatal(err)
		}
		id, err := j.Authenticate(context.Background(), Caller{Token: token})
		if err != nil {
			if !errors.Is(err, ErrUnauthenticated) && !errors.Is(err, ErrPermissionDenied) {
				t.Fatalf("refusal is neither Unauthenticated nor PermissionDenied: %v", err)
			}
			return
		}
		var c struct {
			jwt.Claims
			Kubernetes struct {
				Namespace      string `json:"namespace"`
				ServiceAccount struct {
					Name string `json:"name"`
				} `json:"serviceaccount"`
			} `json:"kubernetes.io"`
		}
		// Claim names are case-sensitive (RFC 7519 section 10.1): decoded
		// as go-jose decodes a token, not as encoding/json (which would
		// read "suB" as the subject).
		if err := josejson.Unmarshal(claims, &c); err != nil {
			t.Fatalf("accepted claims that do not decode: %v", err)
		}
		now := time.Now()
		switch {
		case c.Issuer != testIssuer:
			t.Fatalf("accepted issuer %q", c.Issuer)
		case !slices.Contains([]string(c.Audience), DefaultAudience):
			t.Fatalf("accepted audiences %q", []string(c.Audience))
		case c.Expiry == nil || c.Expiry.Time().Before(now.Add(-jwtLeeway-time.Minute)):
			t.Fatalf("accepted a token without exp or expired (exp %v)", c.Expiry)
		case c.NotBefore != nil && c.NotBefore.Time().After(now.Add(jwtLeeway+time.Minute)):
			t.Fatalf("accepted a token not valid before %v", c.NotBefore.Time())
		}
		ns, sa, ok := strings.Cut(strings.TrimPrefix(c.Subject, "system:serviceaccount:"), ":")
		if !strings.HasPrefix(c.Subject, "system:serviceaccount:") || !ok {
			ns, sa = c.Kubernetes.Namespace, c.Kubernetes.ServiceAccount.Name
		}
		if want := "spiffe://cluster.local/ns/" + ns + "/sa/" + sa; id.String() != want {
			t.Fatalf("claims %s authenticated as %s, want %s", claims, id, want)
		}
	})
}

// FuzzJWKS feeds arbitrary bytes as the key set document (a file or the
// body fetched from the API server). A set that loads holds only public
// signature keys meshproxy verifies with; a private key is always refused.
// Seeds: testdata/fuzz/FuzzJWKS.
func FuzzJWKS(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		set, err := parseJWKS(data)
		if err != nil {
			return
		}
		if len(set.Keys) == 0 {
			t.Fatal("empty key set accepted")
		}
		for _, k := range set.Keys {
			if k.Use != "" && k.Use != "sig" {
				t.Fatalf("key %q for use %q kept", k.KeyID, k.Use)
			}
			switch pub := k.Key.(type) {
			case *rsa.PublicKey:
				if pub.N.BitLen() < 2048 {
					t.Fatalf("RSA key of %d bits kept", pub.N.BitLen())
				}
			case *ecdsa.PublicKey:
				if pub.Curve != elliptic.P256() {
					t.Fatalf("ECDSA key on %s kept", pub.Curve.Params().Name)
				}
			default:
				t.Fatalf("key %q of type %T kept", k.KeyID, k.Key)
			}
		}
		var raw struct {
			Keys []struct {
				Kty string `json:"kty"`
				D   string `json:"d"`
				Use string `json:"use"`
			} `json:"keys"`
		}
		if json.Unmarshal(data, &raw) == nil {
			for _, k := range raw.Keys {
				if (k.Kty == "EC" || k.Kty == "RSA") && k.D != "" && (k.Use == "" || k.Use == "sig") {
					t.Fatal("a set holding a private signature key was accepted")
				}
			}
		}
	})
}

// fuzzJWKS is a JWKS authenticator over a file holding the public half of
// a fresh ES256 key, and that key.
func fuzzJWKS(f *testing.F) (*JWKS, *ecdsa.PrivateKey) {
	f.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	set, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), Algorithm: string(jose.ES256), Use: "sig"}}})
	if err != nil {
		f.Fatal(err)
	}
	path := filepath.Join(f.TempDir(), "jwks.json")
	if err := os.WriteFile(path, set, 0o600); err != nil {
		f.Fatal(err)
	}
	j, err := NewJWKS(path, testIssuer, spiffeid.RequireTrustDomainFromString("cluster.local"), WithLogger(quietLogger()))
	if err != nil {
		f.Fatal(err)
	}
	return j, key
}
