package ca

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/authn/authntest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

// testCA is a CA initialised on disk and served on loopback.
type testCA struct {
	dir   string
	ca    *Authority
	addr  string
	roots *x509.CertPool // from root-cert.pem, as a client would load it
	done  chan error
	stop  context.CancelFunc
}

const tokensFile = `client-token spiffe://cluster.local/ns/demo/sa/client
server-token spiffe://cluster.local/ns/demo/sa/server
foreign-token spiffe://other.org/ns/demo/sa/client
`

// startCA runs `ca init` into a temp dir, loads it and serves it with token
// authentication plus extra authenticators.
func startCA(t testing.TB, extra []authn.Authenticator, opts ...ServerOption) *testCA {
	t.Helper()
	dir := t.TempDir()
	if err := Init(dir, clusterLocal); err != nil {
		t.Fatal(err)
	}
	a, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	tokPath := filepath.Join(dir, "tokens")
	writeFile(t, tokPath, []byte(tokensFile))
	toks, err := authn.NewTokens(tokPath, authn.WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(a, append([]authn.Authenticator{toks}, extra...), append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	tc := &testCA{dir: dir, ca: a}
	tc.addr, tc.stop, tc.done = serveForTest(t, srv)
	tc.roots = x509.NewCertPool()
	if !tc.roots.AppendCertsFromPEM(readFile(t, filepath.Join(dir, RootCertFile))) {
		t.Fatal("root-cert.pem holds no certificates")
	}
	return tc
}

// client dials the CA verifying its certificate for serverName against
// root-cert.pem, optionally presenting a client certificate.
func (tc *testCA) client(t testing.TB, serverName string, cert *tls.Certificate) pb.IstioCertificateServiceClient {
	t.Helper()
	conf := &tls.Config{RootCAs: tc.roots, ServerName: serverName, MinVersion: tls.VersionTLS12}
	if cert != nil {
		conf.Certificates = []tls.Certificate{*cert}
	}
	cc, err := grpc.NewClient(tc.addr, grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return pb.NewIstioCertificateServiceClient(cc)
}

func withToken(ctx context.Context, tok string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// parseChain decodes the response, checking that every element is exactly
// one PEM certificate.
func parseChain(t *testing.T, resp *pb.IstioCertificateResponse) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for i, s := range resp.GetCertChain() {
		block, rest := pem.Decode([]byte(s))
		if block == nil || block.Type != "CERTIFICATE" || strings.TrimSpace(string(rest)) != "" {
			t.Fatalf("cert_chain[%d] is not exactly one PEM certificate", i)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

func TestCreateCertificateStatusCodes(t *testing.T) {
	tc := startCA(t, nil)
	client := tc.client(t, "localhost", nil)
	key := p256(t)
	goodCSR := string(csrPEM(csrDER(t, key, nil)))
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		ctx      func(context.Context) context.Context
		req      *pb.IstioCertificateRequest
		code     codes.Code
		reason   string
		wantID   string
		wantLife time.Duration
	}{
		{"valid token, default validity", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR}, codes.OK, "", "spiffe://cluster.local/ns/demo/sa/client", DefaultTTL},
		{"explicit validity", func(c context.Context) context.Context { return withToken(c, "server-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR, ValidityDuration: 3600}, codes.OK, "", "spiffe://cluster.local/ns/demo/sa/server", time.Hour},
		{"negative validity means default", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR, ValidityDuration: -5}, codes.OK, "", "spiffe://cluster.local/ns/demo/sa/client", DefaultTTL},
		{"wrong token", func(c context.Context) context.Context { return withToken(c, "guess") },
			&pb.IstioCertificateRequest{Csr: goodCSR}, codes.Unauthenticated, ReasonUnauthenticated, "", 0},
		{"missing token", func(c context.Context) context.Context { return c },
			&pb.IstioCertificateRequest{Csr: goodCSR}, codes.Unauthenticated, ReasonUnauthenticated, "", 0},
		{"not a bearer token", func(c context.Context) context.Context {
			return metadata.AppendToOutgoingContext(c, "authorization", "Basic Y2xpZW50LXRva2Vu")
		}, &pb.IstioCertificateRequest{Csr: goodCSR}, codes.Unauthenticated, ReasonUnauthenticated, "", 0},
		{"identity outside the trust domain", func(c context.Context) context.Context { return withToken(c, "foreign-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR}, codes.PermissionDenied, ReasonPermissionDenied, "", 0},
		{"bad CSR", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}, codes.InvalidArgument, ReasonBadCSR, "", 0},
		{"unsupported key", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, rsa1024, nil)))}, codes.InvalidArgument, ReasonUnsupportedKey, "", 0},
		{"validity over the maximum", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR, ValidityDuration: int64(MaxTTL/time.Second) + 1}, codes.InvalidArgument, ReasonTTLTooLong, "", 0},
		{"validity that would overflow", func(c context.Context) context.Context { return withToken(c, "client-token") },
			&pb.IstioCertificateRequest{Csr: goodCSR, ValidityDuration: math.MaxInt64}, codes.InvalidArgument, ReasonTTLTooLong, "", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			issuedBefore := testutil.ToFloat64(metrics.CACertsIssued)
			var refusedBefore float64
			if tt.reason != "" {
				refusedBefore = testutil.ToFloat64(metrics.CACSRErrors.WithLabelValues(tt.reason))
			}
			resp, err := client.CreateCertificate(tt.ctx(testCtx(t)), tt.req)
			if got := status.Code(err); got != tt.code {
				t.Fatalf("code = %v (%v), want %v", got, err, tt.code)
			}
			if tt.code != codes.OK {
				if got := testutil.ToFloat64(metrics.CACSRErrors.WithLabelValues(tt.reason)) - refusedBefore; got != 1 {
					t.Errorf("ca_csr_errors_total{reason=%q} rose by %v, want 1", tt.reason, got)
				}
				if status.Convert(err).Message() == "" {
					t.Error("refusal without a message")
				}
				return
			}
			if got := testutil.ToFloat64(metrics.CACertsIssued) - issuedBefore; got != 1 {
				t.Errorf("ca_certs_issued_total rose by %v, want 1", got)
			}
			chain := parseChain(t, resp)
			if len(chain) != 3 {
				t.Fatalf("cert_chain has %d elements, want leaf, intermediate, root", len(chain))
			}
			if !chain[1].Equal(tc.ca.Chain()[0]) || !chain[2].Equal(tc.ca.Roots()[0]) {
				t.Fatal("cert_chain is not [leaf, ca-cert, root]")
			}
			id, _, err := x509svid.Verify(chain[:2], tc.ca.Bundle())
			if err != nil || id.String() != tt.wantID {
				t.Fatalf("leaf identity = %v, %v; want %s", id, err, tt.wantID)
			}
			if got := chain[0].NotAfter.Sub(chain[0].NotBefore) - ClockSkew; got < tt.wantLife-5*time.Second || got > tt.wantLife+5*time.Second {
				t.Errorf("lifetime = %v, want %v", got, tt.wantLife)
			}
			if !publicKeysEqual(chain[0].PublicKey, key.Public()) {
				t.Error("leaf is not for the CSR's key")
			}
		})
	}
}

func TestServingCertificateVerifiesForIstioNames(t *testing.T) {
	tc := startCA(t, nil, WithServingDNS("ca.mesh.example", "192.0.2.7"))
	for _, name := range []string{"istiod.istio-system.svc", "meshproxy-ca.istio-system.svc", "localhost", "127.0.0.1", "ca.mesh.example"} {
		t.Run(name, func(t *testing.T) {
			_, err := tc.client(t, name, nil).CreateCertificate(withToken(testCtx(t), "client-token"),
				&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))})
			if err != nil {
				t.Fatalf("with server name %s: %v", name, err)
			}
		})
	}
	conn, err := tls.Dial("tcp", tc.addr, &tls.Config{RootCAs: tc.roots, ServerName: "192.0.2.7", NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("IP SAN from --serving-dns: %v", err)
	}
	leaf := conn.ConnectionState().PeerCertificates[0]
	_ = conn.Close()
	id, err := x509svid.IDFromCert(leaf)
	if err != nil || id.Path() != ServingID {
		t.Fatalf("serving identity = %v, %v", id, err)
	}
	_, err = tls.Dial("tcp", tc.addr, &tls.Config{RootCAs: tc.roots, ServerName: "evil.example", NextProtos: []string{"h2"}})
	if err == nil {
		t.Fatal("serving certificate valid for a name it should not carry")
	}
	if _, err := NewServer(tc.ca, nil, WithServingDNS("bad_name!")); err == nil {
		t.Fatal("invalid serving DNS name accepted")
	}
}

func TestSVIDRenewal(t *testing.T) {
	tc := startCA(t, nil)
	ctx := testCtx(t)
	const own = "spiffe://cluster.local/ns/demo/sa/client"

	// Bootstrap with a token, then renew with the certificate alone.
	key := p256(t)
	resp, err := tc.client(t, "localhost", nil).CreateCertificate(withToken(ctx, "client-token"),
		&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, key, nil)))})
	if err != nil {
		t.Fatal(err)
	}
	var cert tls.Certificate
	for _, s := range resp.CertChain[:2] {
		block, _ := pem.Decode([]byte(s))
		cert.Certificate = append(cert.Certificate, block.Bytes)
	}
	cert.PrivateKey = key

	// The CSR asks for another identity; renewal certifies only the caller's own.
	newKey := p256(t)
	u := spiffeid.RequireFromString("spiffe://cluster.local/ns/kube-system/sa/admin").URL()
	csr := string(csrPEM(csrDER(t, newKey, &x509.CertificateRequest{URIs: []*url.URL{u}})))
	resp, err = tc.client(t, "localhost", &cert).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
	if err != nil {
		t.Fatalf("renewal with own SVID: %v", err)
	}
	chain := parseChain(t, resp)
	if id, _, err := x509svid.Verify(chain[:2], tc.ca.Bundle()); err != nil || id.String() != own {
		t.Fatalf("renewed identity = %v, %v; want %s", id, err, own)
	}

	// A certificate from another CA, even for the same ID, is no credential.
	other := testpki.New(t, "cluster.local")
	forged := testpki.TLSCertificate(other.Issue(t, own, time.Hour))
	_, err = tc.client(t, "localhost", &forged).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("foreign SVID: %v, want Unauthenticated", err)
	}
	// ...but a token still works next to it.
	if _, err := tc.client(t, "localhost", &forged).CreateCertificate(withToken(ctx, "server-token"), &pb.IstioCertificateRequest{Csr: csr}); err != nil {
		t.Fatalf("token next to a foreign certificate: %v", err)
	}
	// Neither certificate nor token.
	_, err = tc.client(t, "localhost", nil).CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr})
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no credentials: %v, want Unauthenticated", err)
	}
}

func TestKubernetesCallerThroughGRPC(t *testing.T) {
	api := authntest.NewAPIServer(t)
	api.AddToken("pod-token", authntest.ServiceAccount{Namespace: "demo", Name: "web", Audiences: []string{"istio-ca"}})
	kc, err := authn.KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	tc := startCA(t, []authn.Authenticator{authn.NewKubernetes(kc, clusterLocal, authn.WithLogger(quietLogger()))})
	client := tc.client(t, "istiod.istio-system.svc", nil)
	req := &pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))}
	resp, err := client.CreateCertificate(withToken(testCtx(t), "pod-token"), req)
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := x509svid.IDFromCert(parseChain(t, resp)[0]); id.String() != "spiffe://cluster.local/ns/demo/sa/web" {
		t.Fatalf("identity = %v", id)
	}
	api.DeletePod("pod-token")
	_, err = client.CreateCertificate(withToken(testCtx(t), "pod-token"), req)
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("after the pod was deleted: %v, want Unauthenticated", err)
	}
	api.Close()
	_, err = client.CreateCertificate(withToken(testCtx(t), "pod-token"), req)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("API server down: %v, want Unavailable", err)
	}
}

func TestResponseCarriesAllRootsDuringRootRotation(t *testing.T) {
	tc := startCA(t, nil)
	// Add a second (new) root to the bundle on disk and serve that.
	newRootKey := p256(t)
	newRoot := mkCert(t, caTemplate("next root"), nil, newRootKey.Public(), newRootKey)
	path := filepath.Join(tc.dir, RootCertFile)
	writeFile(t, path, append(readFile(t, path), certsPEM(newRoot)...))
	a, err := Load(tc.dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(a, []authn.Authenticator{mustTokens(t, tc.dir)}, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.CreateCertificate(metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer client-token")),
		&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.CertChain); n != 3 {
		t.Fatalf("cert_chain has %d elements, want 3", n)
	}
	roots, err := parseCertsPEM([]byte(resp.CertChain[2]))
	if err != nil || len(roots) != 2 || !roots[0].Equal(a.Roots()[0]) || !roots[1].Equal(newRoot) {
		t.Fatalf("last element must hold both roots, chain's own first: %d, %v", len(roots), err)
	}
}

func mustTokens(t *testing.T, dir string) *authn.Tokens {
	t.Helper()
	toks, err := authn.NewTokens(filepath.Join(dir, "tokens"), authn.WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	return toks
}

func TestServingCertificateRotates(t *testing.T) {
	tc := startCA(t, nil, WithServingTTL(6*time.Second))
	serial := func() string {
		conn, err := tls.Dial("tcp", tc.addr, &tls.Config{RootCAs: tc.roots, ServerName: "localhost", NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatalf("handshake: %v", err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	first := serial()
	deadline := time.Now().Add(60 * time.Second)
	for serial() == first {
		if time.Now().After(deadline) {
			t.Fatal("serving certificate not renewed within 60s of a 6s lifetime")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestServeStopsGracefullyOnCancel(t *testing.T) {
	tc := startCA(t, nil)
	client := tc.client(t, "localhost", nil)
	if _, err := client.CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))}); err != nil {
		t.Fatal(err)
	}
	tc.stop()
	select {
	case err := <-tc.done:
		if err != nil {
			t.Fatalf("Serve returned %v, want nil", err)
		}
		tc.done <- nil // for the cleanup
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if c, err := net.DialTimeout("tcp", tc.addr, 5*time.Second); err == nil {
		_ = c.Close()
		t.Fatal("listener still accepting after stop")
	}
}

func TestMetricsEndpoint(t *testing.T) {
	tc := startCA(t, nil)
	if _, err := tc.client(t, "localhost", nil).CreateCertificate(withToken(testCtx(t), "client-token"),
		&pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))}); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeMetrics(ctx, lis) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeMetrics: %v", err)
		}
	}()
	wantRoot := fmt.Sprintf("meshproxy_ca_root_expiry_timestamp_seconds %s", formatFloat(float64(tc.ca.RootsNotAfter().Unix())))
	wantChain := fmt.Sprintf("meshproxy_ca_chain_expiry_timestamp_seconds %s", formatFloat(float64(tc.ca.NotAfter().Unix())))
	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	for _, path := range []string{"/metrics", "/stats/prometheus"} {
		resp, err := hc.Get("http://" + lis.Addr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		for _, want := range []string{wantRoot, wantChain, "meshproxy_ca_certs_issued_total", `meshproxy_ca_csr_errors_total{reason="ttl_too_long"}`} {
			if !strings.Contains(string(body), want) {
				t.Errorf("%s lacks %q", path, want)
			}
		}
	}
}

// formatFloat writes f the way Prometheus' text format does (exponent form
// for large values).
func formatFloat(f float64) string { return fmt.Sprintf("%g", f) }

// BenchmarkCSRSigningGRPC measures CSR signings per second through the real
// gRPC server over TLS with token authentication: ECDSA P-256 CSRs,
// parallel clients over several connections.
func BenchmarkCSRSigningGRPC(b *testing.B) {
	tc := startCA(b, nil)
	const conns = 4
	clients := make([]pb.IstioCertificateServiceClient, conns)
	for i := range clients {
		clients[i] = tc.client(b, "localhost", nil)
	}
	csrs := make([]string, 16)
	for i := range csrs {
		csrs[i] = string(csrPEM(csrDER(b, p256(b), nil)))
	}
	ctx := withToken(context.Background(), "client-token")
	var next, failures atomic.Int64
	b.SetParallelism(8)
	b.ReportAllocs()
	b.ResetTimer()
	cpuStart := processCPU(b)
	start := time.Now()
	b.RunParallel(func(pb_ *testing.PB) {
		n := next.Add(1)
		client := clients[n%conns]
		for i := 0; pb_.Next(); i++ {
			if _, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csrs[(int(n)+i)%len(csrs)]}); err != nil {
				failures.Add(1)
			}
		}
	})
	elapsed := time.Since(start)
	cpu := processCPU(b) - cpuStart
	b.StopTimer()
	if f := failures.Load(); f > 0 {
		b.Fatalf("%d signings failed", f)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "signings/s")
	// CPU time of the whole process (clients, server, TLS) per signing: the
	// cost independent of how busy the shared machine is.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/signing")
}

// processCPU is the user+system CPU time this process has used.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
