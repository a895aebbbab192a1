package authn

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/meshproxy/meshproxy/ca/authn/authntest"
)

const testIssuer = "https://kubernetes.default.svc.cluster.local"

func writeJWKS(t *testing.T, path string, data []byte) {
	t.Helper()
	replaceFile(t, path, string(data))
}

func TestJWKSVerifiesServiceAccountTokens(t *testing.T) {
	rs := authntest.NewIssuer(t, testIssuer, jose.RS256)
	es := authntest.NewIssuer(t, testIssuer, jose.ES256)
	stranger := authntest.NewIssuer(t, testIssuer, jose.RS256)
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeJWKS(t, path, authntest.JWKS(t, rs, es))
	j, err := NewJWKS(path, testIssuer, clusterLocal, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	sa := authntest.Token{Namespace: "demo", ServiceAccount: "client"}
	with := func(f func(*authntest.Token)) authntest.Token { tok := sa; f(&tok); return tok }
	tests := []struct {
		name    string
		token   string
		want    string
		wantErr error
		errText string
	}{
		{"good RS256", rs.Sign(t, sa), "spiffe://cluster.local/ns/demo/sa/client", nil, ""},
		{"good ES256", es.Sign(t, sa), "spiffe://cluster.local/ns/demo/sa/client", nil, ""},
		{"audience among several", rs.Sign(t, with(func(tk *authntest.Token) { tk.Audience = []string{"api", "istio-ca"} })), "spiffe://cluster.local/ns/demo/sa/client", nil, ""},
		{"identity from the kubernetes.io claim", rs.Sign(t, with(func(tk *authntest.Token) { tk.Subject = "1234-uid" })), "spiffe://cluster.local/ns/demo/sa/client", nil, ""},
		{"expired", rs.Sign(t, with(func(tk *authntest.Token) {
			tk.Expiry = time.Now().Add(-time.Hour)
			tk.NotBefore = time.Now().Add(-2 * time.Hour)
		})), "", ErrUnauthenticated, "expired"},
		{"not yet valid", rs.Sign(t, with(func(tk *authntest.Token) { tk.NotBefore = time.Now().Add(time.Hour) })), "", ErrUnauthenticated, "nbf"},
		{"wrong audience", rs.Sign(t, with(func(tk *authntest.Token) { tk.Audience = []string{"api"} })), "", ErrUnauthenticated, "audience"},
		{"wrong issuer", rs.Sign(t, with(func(tk *authntest.Token) { tk.Issuer = "https://evil.example" })), "", ErrUnauthenticated, "issuer"},
		{"unknown key", stranger.Sign(t, sa), "", ErrUnauthenticated, "unknown key"},
		{"sub and claim disagree", rs.Sign(t, with(func(tk *authntest.Token) { tk.Subject = "system:serviceaccount:kube-system:admin" })), "", ErrUnauthenticated, "disagrees"},
		{"not a service account", rs.Sign(t, with(func(tk *authntest.Token) { tk.Subject = "alice"; tk.NoKubernetesClaim = true })), "", ErrPermissionDenied, "not a service account"},
		{"tampered payload", tamper(rs.Sign(t, sa)), "", ErrUnauthenticated, ""},
		{"alg none", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "", ErrUnauthenticated, "malformed"},
		{"not a JWT", "s3cret", "", ErrUnauthenticated, "malformed"},
		{"no token", "", "", ErrNoCredentials, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := j.Authenticate(context.Background(), Caller{Token: tt.token})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("err = %v, want %v mentioning %q", err, tt.wantErr, tt.errText)
				}
				return
			}
			if err != nil || id.String() != tt.want {
				t.Fatalf("got %v, %v; want %s", id, err, tt.want)
			}
		})
	}
}

// tamper swaps the payload for one naming another service account, keeping
// the original signature.
func tamper(tok string) string {
	parts := strings.Split(tok, ".")
	parts[1] = "eyJpc3MiOiJodHRwczovL2t1YmVybmV0ZXMuZGVmYXVsdC5zdmMuY2x1c3Rlci5sb2NhbCIsInN1YiI6InN5c3RlbTpzZXJ2aWNlYWNjb3VudDprdWJlLXN5c3RlbTphZG1pbiIsImF1ZCI6WyJpc3Rpby1jYSJdLCJleHAiOjQxMDI0NDQ4MDB9"
	return strings.Join(parts, ".")
}

func TestJWKSRejectsBadKeySets(t *testing.T) {
	tests := []struct{ name, content, want string }{
		{"not json", "nope", "decode"},
		{"empty", `{"keys":[]}`, "no usable"},
		{"private key", `{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","d":"870MB6gfuTJ4HtUnUvYMyJpr5eUZNP4Bk43bVdj3eAE","kid":"1"}]}`, "private"},
		{"symmetric only", `{"keys":[{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0","kid":"h"}]}`, "no usable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "jwks.json")
			writeJWKS(t, path, []byte(tt.content))
			_, err := NewJWKS(path, testIssuer, clusterLocal)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("err = %v, want it to name %s and mention %q", err, path, tt.want)
			}
		})
	}
	if _, err := NewJWKS("http://127.0.0.1:1/jwks", testIssuer, clusterLocal); err == nil || !strings.Contains(err.Error(), "https") {
		t.Fatalf("plain http JWKS URL: err = %v", err)
	}
	if _, err := NewJWKS("x", "", clusterLocal); err == nil {
		t.Fatal("JWKS without issuer accepted")
	}
}

func TestJWKSFileReload(t *testing.T) {
	old := authntest.NewIssuer(t, testIssuer, jose.RS256)
	next := authntest.NewIssuer(t, testIssuer, jose.ES256)
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeJWKS(t, path, authntest.JWKS(t, old))
	j, err := NewJWKS(path, testIssuer, clusterLocal, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	sa := authntest.Token{Namespace: "demo", ServiceAccount: "client"}
	if _, err := j.Authenticate(context.Background(), Caller{Token: next.Sign(t, sa)}); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("token of a key not yet in the file: %v", err)
	}
	writeJWKS(t, path, authntest.JWKS(t, next))
	if _, err := j.Authenticate(context.Background(), Caller{Token: next.Sign(t, sa)}); err != nil {
		t.Fatalf("after adding the key: %v", err)
	}
	if _, err := j.Authenticate(context.Background(), Caller{Token: old.Sign(t, sa)}); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("removed key still trusted: %v", err)
	}
	writeJWKS(t, path, []byte("garbage"))
	if _, err := j.Authenticate(context.Background(), Caller{Token: next.Sign(t, sa)}); err != nil {
		t.Fatalf("a bad file must keep the last good keys: %v", err)
	}
}

// jwksServer serves a swappable JWKS over TLS and counts fetches.
type jwksServer struct {
	*httptest.Server
	mu      sync.Mutex
	body    []byte
	fetches int
}

func newJWKSServer(t *testing.T, body []byte) *jwksServer {
	s := &jwksServer{body: body}
	s.Server = httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/openid/v1/jwks" {
			http.NotFound(w, r)
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		s.fetches++
		w.Header().Set("Content-Type", "application/jwk-set+json")
		_, _ = w.Write(s.body)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) set(body []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.body = body
}

func (s *jwksServer) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fetches
}

func TestJWKSURLRefreshesOnUnknownKeyAndPeriodically(t *testing.T) {
	old := authntest.NewIssuer(t, testIssuer, jose.RS256)
	next := authntest.NewIssuer(t, testIssuer, jose.RS256)
	srv := newJWKSServer(t, authntest.JWKS(t, old))
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); defer mu.Unlock(); now = now.Add(d) }

	j, err := NewJWKS(srv.URL+"/openid/v1/jwks", testIssuer, clusterLocal,
		WithHTTPClient(srv.Client()), WithRefresh(time.Hour, time.Minute), WithLogger(quietLogger()), WithClock(clock))
	if err != nil {
		t.Fatal(err)
	}
	// The fake clock moves hours ahead: tokens must outlive it.
	sa := authntest.Token{Namespace: "demo", ServiceAccount: "client", Expiry: now.Add(24 * time.Hour)}
	auth := func(tok string) error {
		_, err := j.Authenticate(context.Background(), Caller{Token: tok})
		return err
	}
	if err := auth(old.Sign(t, sa)); err != nil {
		t.Fatal(err)
	}
	srv.set(authntest.JWKS(t, old, next))
	// A new key ID right after a fetch is rate limited...
	if err := auth(next.Sign(t, sa)); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("unknown key accepted without a refresh: %v", err)
	}
	// ...and fetched once the minimum interval has passed.
	advance(2 * time.Minute)
	if err := auth(next.Sign(t, sa)); err != nil {
		t.Fatalf("unknown key should trigger a refresh: %v", err)
	}
	if got := srv.count(); got != 2 {
		t.Fatalf("fetches = %d, want 2", got)
	}
	// Known keys do not cause fetches until the refresh period passes.
	for range 5 {
		if err := auth(old.Sign(t, sa)); err != nil {
			t.Fatal(err)
		}
	}
	if got := srv.count(); got != 2 {
		t.Fatalf("fetches = %d after known keys, want 2", got)
	}
	srv.set(authntest.JWKS(t, next))
	advance(2 * time.Hour)
	if err := auth(old.Sign(t, sa)); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("periodic refresh should drop the removed key: %v", err)
	}
	// A failing endpoint keeps the last good keys.
	srv.set([]byte("oops"))
	advance(2 * time.Hour)
	if err := auth(next.Sign(t, sa)); err != nil {
		t.Fatalf("failed refresh must keep the keys: %v", err)
	}
}

func TestJWKSFirstLoadMustSucceed(t *testing.T) {
	if _, err := NewJWKS(filepath.Join(t.TempDir(), "missing.json"), testIssuer, clusterLocal); err == nil || !os.IsNotExist(errors.Unwrap(err)) && !strings.Contains(err.Error(), "missing.json") {
		t.Fatalf("missing file: err = %v", err)
	}
	srv := newJWKSServer(t, []byte("{}"))
	if _, err := NewJWKS(srv.URL+"/nope", testIssuer, clusterLocal, WithHTTPClient(srv.Client())); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("404 URL: err = %v", err)
	}
}

func TestJWKSThroughKubeAPIStaysOnTheAPIServer(t *testing.T) {
	api := authntest.NewAPIServer(t)
	kc, err := KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	// The cluster's own JWKS endpoint, fetched with the kubeconfig's
	// credentials and CA.
	iss := authntest.NewIssuer(t, testIssuer, jose.RS256)
	api.SetJWKS(authntest.JWKS(t, iss))
	j, err := NewJWKS(api.URL+"/openid/v1/jwks", testIssuer, clusterLocal, WithHTTPClient(kc))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := j.Authenticate(context.Background(), Caller{Token: iss.Sign(t, authntest.Token{Namespace: "demo", ServiceAccount: "client"})}); err != nil {
		t.Fatal(err)
	}

	other := newJWKSServer(t, authntest.JWKS(t, authntest.NewIssuer(t, testIssuer, jose.ES256)))
	_, err = NewJWKS(other.URL+"/openid/v1/jwks", testIssuer, clusterLocal, WithHTTPClient(kc))
	if err == nil || !strings.Contains(err.Error(), "refusing to send API server credentials") {
		t.Fatalf("err = %v, want the credentials kept from another host", err)
	}
	if other.count() != 0 {
		t.Fatal("the other host was contacted")
	}
}
