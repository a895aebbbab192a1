package vault_test

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/catest"
	"github.com/meshproxy/meshproxy/ca/vault"
	"github.com/meshproxy/meshproxy/ca/vault/vaulttest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

const (
	clientID   = "spiffe://cluster.local/ns/demo/sa/client"
	vaultToken = "hvs.test-token"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fixture is a fake Vault, a Signer for it and a meshproxy CA serving
// through that Signer on loopback.
type fixture struct {
	vault     *vaulttest.Server
	signer    *vault.Signer
	tokenFile string
	addr      string
	dir       string
	roots     []*x509.Certificate
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{dir: t.TempDir()}
	f.vault = vaulttest.Start(t, testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour), vaultToken)
	f.tokenFile = filepath.Join(f.dir, "vault-token")
	writeFile(t, f.tokenFile, vaultToken+"\n")
	var err error
	f.signer, err = vault.New(context.Background(), f.vault.URL, f.tokenFile, f.vault.Role,
		vault.WithCACert(f.vault.CAPEM), vault.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.signer.Close)
	return f
}

// serve starts the meshproxy CA over the fixture's signer.
func (f *fixture) serve(t *testing.T) {
	t.Helper()
	a, err := ca.NewFromSigner(f.signer)
	if err != nil {
		t.Fatal(err)
	}
	f.roots = a.Roots()
	tokens := filepath.Join(f.dir, "tokens")
	writeFile(t, tokens, "client-token "+clientID+"\n")
	writeFile(t, filepath.Join(f.dir, "client.token"), "client-token")
	toks, err := authn.NewTokens(tokens, authn.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(a, []authn.Authenticator{toks}, ca.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	// Serving starts once Vault has issued the CA's own certificate.
	f.addr = catest.Serve(t, srv, f.roots, 30*time.Second)
}

func (f *fixture) tlsConfig() *tls.Config {
	pool := x509.NewCertPool()
	for _, r := range f.roots {
		pool.AddCert(r)
	}
	return &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
}

// create calls CreateCertificate as client-token with a CSR for a fresh key
// carrying csrURI as URI SAN (empty: none).
func (f *fixture) create(t *testing.T, csrURI string) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	cc, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(f.tlsConfig())))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	tmpl := &x509.CertificateRequest{}
	if csrURI != "" {
		u, err := url.Parse(csrURI)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer client-token")
	return pb.NewIstioCertificateServiceClient(cc).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func csrErrors(reason string) float64 {
	return testutil.ToFloat64(metrics.CACSRErrors.WithLabelValues(reason))
}

// TestVaultIssuesSVIDsForSidecars: a sidecar's Rotator gets a working SVID
// signed by Vault through the meshproxy CA, and Vault saw exactly the
// request of its API.
func TestVaultIssuesSVIDsForSidecars(t *testing.T) {
	f := newFixture(t)
	if roots := f.signer.Roots(); len(roots) != 1 || !roots[0].Equal(f.vault.PKI.Root) {
		t.Fatalf("roots read from the mount's CA chain = %d certificates, want its root", len(roots))
	}
	f.serve(t)

	client, err := caclient.New(f.addr, caclient.WithRoots(f.roots...), caclient.WithServerName("localhost"),
		caclient.WithTokenFile(filepath.Join(f.dir, "client.token")))
	if err != nil {
		t.Fatal(err)
	}
	r, err := tlsmgr.NewRotator(client, tlsmgr.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := r.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.Status()
	if st.ID.String() != clientID || len(st.Chain) != 2 || !st.Chain[1].Equal(f.vault.PKI.Intermediate) {
		t.Fatalf("SVID %s with %d certificates, want %s signed by Vault's intermediate", st.ID, len(st.Chain), clientID)
	}
	if b := st.Bundles; len(b) != 1 || !b[0].X509Authorities()[0].Equal(f.vault.PKI.Root) {
		t.Fatal("trust bundle is not Vault's root")
	}

	calls := f.vault.Signed()
	last := calls[len(calls)-1]
	if last.Token != vaultToken {
		t.Errorf("X-Vault-Token = %q", last.Token)
	}
	if last.Body["uri_sans"] != clientID || last.Body["ttl"] != "86400s" {
		t.Errorf("sign body uri_sans %v ttl %v", last.Body["uri_sans"], last.Body["ttl"])
	}
	if _, ok := last.Body["alt_names"]; ok {
		t.Error("a workload request asked for DNS names")
	}
	serving := calls[0]
	if !strings.Contains(serving.Body["alt_names"].(string), "istiod.istio-system.svc") || serving.Body["ip_sans"] != "127.0.0.1,::1" {
		t.Errorf("serving certificate request: alt_names %v ip_sans %v", serving.Body["alt_names"], serving.Body["ip_sans"])
	}

	// The response is istiod's: leaf, Vault's intermediate, Vault's root.
	resp, err := f.create(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.CertChain); n != 3 {
		t.Fatalf("cert_chain has %d elements, want leaf, intermediate, root", n)
	}
	root, err := tlsmgr.ParseCertificatesPEM([]byte(resp.CertChain[2]))
	if err != nil || len(root) != 1 || !root[0].Equal(f.vault.PKI.Root) {
		t.Fatalf("last element is not Vault's root: %v", err)
	}
}

// TestVaultWrongSANIsRefused: a role that copies the CSR's SANs
// (use_csr_sans) would hand a caller any identity it asks for; the CA
// refuses the certificate, says why, and counts it.
func TestVaultWrongSANIsRefused(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	f.vault.UseCSRSANs(true)
	before := csrErrors(ca.ReasonBackendInvalid)
	_, err := f.create(t, "spiffe://cluster.local/ns/kube-system/sa/admin")
	if status.Code(err) != codes.Internal {
		t.Fatalf("code = %v, want Internal: %v", status.Code(err), err)
	}
	msg := status.Convert(err).Message()
	if !strings.Contains(msg, "vault") || !strings.Contains(msg, "ns/kube-system/sa/admin") || !strings.Contains(msg, clientID) {
		t.Errorf("message does not say what Vault did wrong: %s", msg)
	}
	if got := csrErrors(ca.ReasonBackendInvalid) - before; got != 1 {
		t.Errorf("backend_invalid counted %v times, want 1", got)
	}
	// The same role, honest CSR: fine.
	if _, err := f.create(t, clientID); err != nil {
		t.Fatalf("honest CSR: %v", err)
	}
}

// TestVaultErrorsAreClearStatuses: what Vault answers decides the status
// sidecars see, with Vault's message in it.
func TestVaultErrorsAreClearStatuses(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	tests := []struct {
		name   string
		setup  func()
		code   codes.Code
		reason string
		want   string
	}{
		{"sealed", func() { f.vault.Fail(http.StatusServiceUnavailable, "Vault is sealed") }, codes.Unavailable, ca.ReasonBackendUnavailable, "Vault is sealed"},
		{"rate limited", func() {
			f.vault.Fail(http.StatusTooManyRequests, "request path \"pki/sign/meshproxy\": rate limit quota exceeded")
		}, codes.Unavailable, ca.ReasonBackendUnavailable, "rate limit"},
		{"token revoked", func() { writeFile(t, f.tokenFile, "hvs.revoked") }, codes.Internal, ca.ReasonBackendError, "403 Forbidden: permission denied"},
		{"role refuses", func() {
			f.vault.Fail(http.StatusBadRequest, "URI SANs spiffe://cluster.local/ns/demo/sa/client not allowed by this role")
		}, codes.Internal, ca.ReasonBackendError, "not allowed by this role"},
		{"vault down", func() { f.vault.Close() }, codes.Unavailable, ca.ReasonBackendUnavailable, "connect"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.vault.Fail(0)
			writeFile(t, f.tokenFile, vaultToken)
			tt.setup()
			before := csrErrors(tt.reason)
			_, err := f.create(t, "")
			if status.Code(err) != tt.code {
				t.Fatalf("code = %v, want %v: %v", status.Code(err), tt.code, err)
			}
			if msg := status.Convert(err).Message(); !strings.Contains(msg, tt.want) || !strings.Contains(msg, "/v1/pki/sign/meshproxy") {
				t.Errorf("message %q does not carry Vault's answer %q and the path", msg, tt.want)
			}
			if got := csrErrors(tt.reason) - before; got != 1 {
				t.Errorf("%s counted %v times, want 1", tt.reason, got)
			}
		})
	}
}

// TestVaultTokenFileIsReadForEveryRequest: a token rotated by Vault Agent
// is used from the next request on, without restart.
func TestVaultTokenFileIsReadForEveryRequest(t *testing.T) {
	f := newFixture(t)
	f.vault.AllowToken("hvs.rotated")
	writeFile(t, f.tokenFile, "hvs.rotated\n")
	a, err := ca.NewFromSigner(f.signer)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.SignChain(context.Background(), csr, spiffeid.RequireFromString(clientID), time.Hour); err != nil {
		t.Fatal(err)
	}
	if calls := f.vault.Signed(); calls[len(calls)-1].Token != "hvs.rotated" {
		t.Fatalf("token sent = %q, want the rotated one", calls[len(calls)-1].Token)
	}
}

// TestVaultRoots: the trust bundle is pinned by WithRoots, otherwise taken
// from the mount's chain, which must then hold the root.
func TestVaultRoots(t *testing.T) {
	f := newFixture(t)
	other := testpki.New(t, "cluster.local")
	s, err := vault.New(context.Background(), f.vault.URL, f.tokenFile, f.vault.Role,
		vault.WithCACert(f.vault.CAPEM), vault.WithRoots(other.Root), vault.WithLogger(quiet()))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := s.Roots(); len(r) != 1 || !r[0].Equal(other.Root) {
		t.Fatal("WithRoots not used")
	}
	// Pinned to another root, Vault's certificates do not chain: refused.
	a, err := ca.NewFromSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.SignChain(context.Background(), csr, spiffeid.RequireFromString(clientID), time.Hour); !errors.Is(err, ca.ErrBackendInvalid) {
		t.Fatalf("certificate chaining to another root: %v, want ErrBackendInvalid", err)
	}

	f.vault.ChainIncludesRoot(false)
	if _, err := vault.New(context.Background(), f.vault.URL, f.tokenFile, f.vault.Role,
		vault.WithCACert(f.vault.CAPEM), vault.WithLogger(quiet())); err == nil || !strings.Contains(err.Error(), "no root") {
		t.Fatalf("chain without root: %v", err)
	}
}

func TestNewValidatesSettings(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	writeFile(t, tok, "hvs.x")
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, "\n")
	root := testpki.New(t, "cluster.local").Root
	ctx := context.Background()
	tests := []struct {
		name, addr, token, role string
		opts                    []vault.Option
		want                    string
	}{
		{"bad address", "vault:8200", tok, "r", nil, "want https://"},
		{"missing token file", "https://vault:8200", filepath.Join(dir, "nope"), "r", nil, "token file"},
		{"empty token file", "https://vault:8200", empty, "r", nil, "empty"},
		{"no role", "https://vault:8200", tok, "", nil, "role"},
		{"role with a slash", "https://vault:8200", tok, "a/b", nil, "role"},
		{"bad mount", "https://vault:8200", tok, "r", []vault.Option{vault.WithMount("/")}, "mount"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := vault.New(ctx, tt.addr, tt.token, tt.role, append(tt.opts, vault.WithRoots(root))...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

// TestVaultTLSFromEnvironment: Vault's TLS comes from the VAULT_* variables
// Vault's own client reads; a bad one fails at start and says which.
func TestVaultTLSFromEnvironment(t *testing.T) {
	f := newFixture(t)
	caDir := filepath.Join(f.dir, "vault-cas")
	if err := os.Mkdir(caDir, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(caDir, "vault.pem"), string(f.vault.CAPEM))
	garbage := filepath.Join(f.dir, "garbage.pem")
	writeFile(t, garbage, "not a certificate")
	newSigner := func() error {
		s, err := vault.New(context.Background(), f.vault.URL, f.tokenFile, f.vault.Role, vault.WithLogger(quiet()))
		if err == nil {
			s.Close()
		}
		return err
	}
	tests := []struct {
		name string
		env  map[string]string
		want string // "" for success
	}{
		{"no CA: the system's, which do not trust the test server", nil, "certificate"},
		{"VAULT_CAPATH", map[string]string{"VAULT_CAPATH": caDir}, ""},
		{"VAULT_CACERT without a certificate", map[string]string{"VAULT_CACERT": garbage}, "no PEM certificate"},
		{"VAULT_CACERT missing", map[string]string{"VAULT_CACERT": filepath.Join(f.dir, "nope.pem")}, "VAULT_CACERT"},
		{"client certificate without its key", map[string]string{"VAULT_CAPATH": caDir, "VAULT_CLIENT_CERT": garbage}, "go together"},
		{"VAULT_SKIP_VERIFY", map[string]string{"VAULT_SKIP_VERIFY": "true"}, ""},
		{"VAULT_SKIP_VERIFY not a boolean", map[string]string{"VAULT_SKIP_VERIFY": "maybe"}, "VAULT_SKIP_VERIFY"},
		{"VAULT_TLS_SERVER_NAME not the server's", map[string]string{"VAULT_CAPATH": caDir, "VAULT_TLS_SERVER_NAME": "vault.elsewhere"}, "vault.elsewhere"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, k := range []string{"VAULT_CACERT", "VAULT_CAPATH", "VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY", "VAULT_SKIP_VERIFY", "VAULT_TLS_SERVER_NAME"} {
				t.Setenv(k, tt.env[k])
			}
			err := newSigner()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("New: %v, want an error mentioning %q", err, tt.want)
			}
		})
	}
}

// TestVaultNamespaceHeader: VAULT_NAMESPACE (Vault Enterprise) travels as
// X-Vault-Namespace; a mount that does not exist (404) says so.
func TestVaultNamespaceHeader(t *testing.T) {
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case got <- r.Header.Get("X-Vault-Namespace"):
		default:
		}
		w.WriteHeader(http.StatusNotFound)
		_, _ = io.WriteString(w, `{"errors":[]}`)
	}))
	defer srv.Close()
	t.Setenv("VAULT_NAMESPACE", "team-a")
	tok := filepath.Join(t.TempDir(), "token")
	writeFile(t, tok, vaultToken)
	_, err := vault.New(context.Background(), srv.URL, tok, "meshproxy", vault.WithLogger(quiet()))
	if err == nil || !strings.Contains(err.Error(), "no such path") {
		t.Fatalf("New against a missing mount: %v, want no such path", err)
	}
	if ns := <-got; ns != "team-a" {
		t.Errorf("X-Vault-Namespace = %q, want team-a", ns)
	}
}
