package catest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

// Quiet is a logger that drops everything.
func Quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// ServeTokens serves a over gRPC on loopback (see Serve) with --auth token
// for tokens, "TOKEN SPIFFE-ID" lines, and returns its address.
func ServeTokens(t testing.TB, a *ca.Authority, tokens ...string) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(file, []byte(strings.Join(tokens, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	toks, err := authn.NewTokens(file, authn.WithLogger(Quiet()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(a, []authn.Authenticator{toks}, ca.WithLogger(Quiet()))
	if err != nil {
		t.Fatal(err)
	}
	return Serve(t, srv, a.Roots(), 30*time.Second)
}

// NewCSR is a DER CSR without SANs for a fresh P-256 key.
func NewCSR(t testing.TB) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, testpki.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// Create calls CreateCertificate at addr (TLS for "localhost" under roots)
// with token and a fresh CSR for one hour.
func Create(t testing.TB, addr string, roots []*x509.Certificate, token string) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	conf := &tls.Config{RootCAs: pool, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12}
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	return pb.NewIstioCertificateServiceClient(cc).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: NewCSR(t)})), ValidityDuration: 3600,
	})
}

// CSRErrors is the current meshproxy_ca_csr_errors_total{reason}.
func CSRErrors(reason string) float64 {
	return testutil.ToFloat64(metrics.CACSRErrors.WithLabelValues(reason))
}
