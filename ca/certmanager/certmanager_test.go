package certmanager_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/certmanager"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

const clientID = "spiffe://cluster.local/ns/demo/sa/client"

// unreachableAPI is an API server connection nothing answers on: the tests
// below must fail before any request.
func unreachableAPI(t *testing.T) *authn.KubeAPI {
	t.Helper()
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
current-context: c
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	api, err := authn.KubeconfigAPI(kc)
	if err != nil {
		t.Fatal(err)
	}
	return api
}

// TestCSRMustNameTheCaller: cert-manager signs the CSR as it is, so a CSR
// that does not name exactly the caller is InvalidArgument, before any
// CertificateRequest exists.
func TestCSRMustNameTheCaller(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	s, err := certmanager.New(unreachableAPI(t), "istio-system", certmanager.IssuerRef{Name: "mesh-ca"}, []*x509.Certificate{pki.Root})
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.NewFromSigner(s)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")
	self, _ := url.Parse(clientID)
	tests := []struct {
		name string
		tmpl *x509.CertificateRequest
		want string
	}{
		{"no URI SAN", &x509.CertificateRequest{}, "only URI SAN must be the caller's"},
		{"another identity", &x509.CertificateRequest{URIs: []*url.URL{other}}, "only URI SAN must be the caller's"},
		{"two URIs", &x509.CertificateRequest{URIs: []*url.URL{self, other}}, "only URI SAN must be the caller's"},
		{"a DNS name", &x509.CertificateRequest{URIs: []*url.URL{self}, DNSNames: []string{"kubernetes.default.svc"}}, "DNS SAN"},
		{"an email", &x509.CertificateRequest{URIs: []*url.URL{self}, EmailAddresses: []string{"a@b.c"}}, "email"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			csr, err := x509.CreateCertificateRequest(rand.Reader, tt.tmpl, testpki.NewKey(t))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err = a.SignChain(ctx, csr, spiffeid.RequireFromString(clientID), time.Hour)
			if !errors.Is(err, ca.ErrBadCSR) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrBadCSR mentioning %q", err, tt.want)
			}
		})
	}
	// A CSR naming the caller goes to the API server, which is not there.
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{self}}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.SignChain(context.Background(), csr, spiffeid.RequireFromString(clientID), time.Hour); !errors.Is(err, ca.ErrBackendUnavailable) {
		t.Fatalf("unreachable API server: %v, want ErrBackendUnavailable", err)
	}
}

func TestNewValidatesSettings(t *testing.T) {
	root := testpki.New(t, "cluster.local").Root
	api := unreachableAPI(t)
	tests := []struct {
		name, ns string
		issuer   certmanager.IssuerRef
		roots    []*x509.Certificate
		want     string
	}{
		{"bad namespace", "Istio_System", certmanager.IssuerRef{Name: "a"}, []*x509.Certificate{root}, "namespace"},
		{"no issuer", "istio-system", certmanager.IssuerRef{}, []*x509.Certificate{root}, "issuer name"},
		{"no root", "istio-system", certmanager.IssuerRef{Name: "a"}, nil, "root"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := certmanager.New(api, tt.ns, tt.issuer, tt.roots); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}
