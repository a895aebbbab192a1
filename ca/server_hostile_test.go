package ca

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/authn/authntest"
	"github.com/meshproxy/meshproxy/metrics"
)

const hostileIssuer = "https://kubernetes.default.svc.cluster.local"

func csrErrors(reason string) float64 {
	return testutil.ToFloat64(metrics.CACSRErrors.WithLabelValues(reason))
}

func TestCSRAskingForAnotherIdentityGetsTheCallers(t *testing.T) {
	tc := startCA(t, nil)
	client := tc.client(t, "localhost", nil)
	isCA, err := asn1.Marshal(struct{ IsCA bool }{true})
	if err != nil {
		t.Fatal(err)
	}
	admin, _ := url.Parse("spiffe://cluster.local/ns/kube-system/sa/admin")
	foreign, _ := url.Parse("spiffe://other.org/ns/demo/sa/client")
	key := p256(t)
	csr := csrPEM(csrDER(t, key, &x509.CertificateRequest{
		Subject:         pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}},
		URIs:            []*url.URL{admin, foreign},
		DNSNames:        []string{"kubernetes.default.svc", "*.cluster.local"},
		IPAddresses:     []net.IP{net.IPv4(10, 96, 0, 1)},
		EmailAddresses:  []string{"root@cluster.local"},
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: isCA}},
	}))
	resp, err := client.CreateCertificate(withToken(testCtx(t), "client-token"), &pb.IstioCertificateRequest{Csr: string(csr)})
	if err != nil {
		t.Fatalf("CSR with foreign SANs: %v", err)
	}
	chain := parseChain(t, resp)
	leaf := chain[0]
	id, _, err := x509svid.Verify(chain[:2], tc.ca.Bundle())
	if err != nil || id.String() != "spiffe://cluster.local/ns/demo/sa/client" {
		t.Fatalf("identity %v (%v), want the caller's spiffe://cluster.local/ns/demo/sa/client", id, err)
	}
	if len(leaf.URIs) != 1 || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Errorf("SANs from the CSR survived: uris %v dns %v ips %v emails %v", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	if leaf.IsCA || leaf.Subject.CommonName == "admin" || slices.Contains(leaf.Subject.Organization, "system:masters") {
		t.Errorf("CSR subject or CA request honoured: isCA %v subject %q", leaf.IsCA, leaf.Subject)
	}
	if !publicKeysEqual(leaf.PublicKey, key.Public()) {
		t.Error("certificate is not over the CSR's key")
	}
}

func TestTokensForTheWrongAudienceOrExpiredAreRefused(t *testing.T) {
	iss := authntest.NewIssuer(t, hostileIssuer, jose.ES256)
	jwksPath := filepath.Join(t.TempDir(), "jwks.json")
	writeFile(t, jwksPath, authntest.JWKS(t, iss))
	jwks, err := authn.NewJWKS(jwksPath, hostileIssuer, clusterLocal, authn.WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	api := authntest.NewAPIServer(t)
	api.AddToken("pod-token-api-audience", authntest.ServiceAccount{Namespace: "demo", Name: "web", Audiences: []string{"api"}})
	api.AddToken("pod-token", authntest.ServiceAccount{Namespace: "demo", Name: "web", Audiences: []string{"istio-ca"}})
	kc, err := authn.KubeconfigAPI(api.WriteKubeconfig(t, t.TempDir(), true))
	if err != nil {
		t.Fatal(err)
	}
	tc := startCA(t, []authn.Authenticator{jwks, authn.NewKubernetes(kc, clusterLocal, authn.WithLogger(quietLogger()))})
	client := tc.client(t, "localhost", nil)
	csr := string(csrPEM(csrDER(t, p256(t), nil)))
	sa := authntest.Token{Namespace: "demo", ServiceAccount: "web"}
	now := time.Now()

	tests := []struct {
		name, token, why string
		ignoreAudiences  bool
	}{
		{"JWT for another audience", iss.Sign(t, authntest.Token{Namespace: "demo", ServiceAccount: "web", Audience: []string{"api"}}), "audience", false},
		{"expired JWT", iss.Sign(t, authntest.Token{Namespace: "demo", ServiceAccount: "web", Expiry: now.Add(-time.Hour), NotBefore: now.Add(-2 * time.Hour)}), "expired", false},
		{"JWT from another issuer", iss.Sign(t, authntest.Token{Namespace: "demo", ServiceAccount: "web", Issuer: "https://evil.example"}), "issuer", false},
		{"TokenReview token for another audience", "pod-token-api-audience", "audience", false},
		{"TokenReview by an API server that ignores audiences", "pod-token", "audience", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			api.IgnoreAudiences.Store(tt.ignoreAudiences)
			refused := csrErrors(ReasonUnauthenticated)
			_, err := client.CreateCertificate(withToken(testCtx(t), tt.token), &pb.IstioCertificateRequest{Csr: csr})
			api.IgnoreAudiences.Store(false)
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("got %v, want Unauthenticated", err)
			}
			if !strings.Contains(strings.ToLower(status.Convert(err).Message()), tt.why) {
				t.Errorf("refusal does not say %q: %s", tt.why, status.Convert(err).Message())
			}
			if got := csrErrors(ReasonUnauthenticated) - refused; got != 1 {
				t.Errorf("ca_csr_errors_total{unauthenticated} rose by %v, want 1", got)
			}
			// The CA still serves a good caller with each method.
			for _, good := range []string{iss.Sign(t, sa), "pod-token", "client-token"} {
				if _, err := client.CreateCertificate(withToken(testCtx(t), good), &pb.IstioCertificateRequest{Csr: csr}); err != nil {
					t.Fatalf("good caller refused after the bad token: %v", err)
				}
			}
		})
	}
}

func TestBadCSRFloodDoesNotStarveGoodCallers(t *testing.T) {
	const (
		flooders    = 16
		goodCallers = 10
	)
	tc := startCA(t, nil)
	// The good callers come from another address: the flooding address is
	// throttled as a whole once its guessed tokens pass the burst.
	good := tc.clientFrom(t, "127.0.0.2")
	bad := make([]pb.IstioCertificateServiceClient, 4) // the flood spreads over a few connections
	for i := range bad {
		bad[i] = tc.client(t, "localhost", nil)
	}
	validDER := csrDER(t, p256(t), nil)
	badSig := slices.Clone(validDER)
	badSig[len(badSig)-3] ^= 0xff
	junk := make([]byte, 60<<10) // printable (proto strings are UTF-8), just under the CSR size limit
	for i := range junk {
		junk[i] = byte(' ' + i*31%95)
	}
	floods := []struct {
		token, csr, reason string
	}{
		{"client-token", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", ReasonBadCSR},
		{"client-token", string(csrPEM(badSig)), ReasonBadCSR},
		{"client-token", string(junk), ReasonBadCSR},
		{"guessed-token", string(csrPEM(validDER)), ReasonUnauthenticated},
	}
	before := map[string]float64{ReasonBadCSR: csrErrors(ReasonBadCSR), ReasonUnauthenticated: csrErrors(ReasonUnauthenticated)}

	ctx, stop := context.WithTimeout(context.Background(), 2*time.Minute)
	defer stop()
	var (
		wg        sync.WaitGroup
		sent      [4]atomic.Int64 // answered with the refusal of their kind
		throttled atomic.Int64    // answered ResourceExhausted
		unusual   atomic.Value    // first answer that is not the expected refusal
	)
	for i := range flooders {
		wg.Go(func() {
			for n := 0; ctx.Err() == nil; n++ {
				k := (i + n) % len(floods)
				rctx, cancel := context.WithTimeout(withToken(ctx, floods[k].token), 30*time.Second)
				_, err := bad[i%len(bad)].CreateCertificate(rctx, &pb.IstioCertificateRequest{Csr: floods[k].csr})
				cancel()
				if ctx.Err() != nil {
					return
				}
				want := codes.InvalidArgument
				if floods[k].reason == ReasonUnauthenticated {
					want = codes.Unauthenticated
				}
				switch status.Code(err) {
				case want:
					sent[k].Add(1)
				case codes.ResourceExhausted: // the address guessed too often
					throttled.Add(1)
				default:
					unusual.CompareAndSwap(nil, fmt.Sprintf("flood %d: %v, want %v", k, err, want))
				}
			}
		})
	}
	// Let the flood get going before measuring.
	deadline := time.Now().Add(time.Minute)
	for sent[0].Load()+sent[1].Load()+sent[2].Load()+sent[3].Load()+throttled.Load() < 4*flooders && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	var latencies []time.Duration
	for i := range goodCallers {
		start := time.Now()
		rctx, cancel := context.WithTimeout(withToken(context.Background(), "server-token"), 60*time.Second)
		resp, err := good.CreateCertificate(rctx, &pb.IstioCertificateRequest{Csr: string(csrPEM(csrDER(t, p256(t), nil)))})
		cancel()
		if err != nil {
			stop()
			wg.Wait()
			t.Fatalf("good caller %d refused during the flood: %v", i, err)
		}
		latencies = append(latencies, time.Since(start))
		if id, _ := x509svid.IDFromCert(parseChain(t, resp)[0]); id.String() != "spiffe://cluster.local/ns/demo/sa/server" {
			t.Fatalf("good caller got identity %v", id)
		}
	}
	floodRunning := ctx.Err() == nil
	stop()
	wg.Wait()
	if !floodRunning {
		t.Fatal("the flood ended before the good callers were served; the measurement is void")
	}
	if u := unusual.Load(); u != nil {
		t.Errorf("a flood request got an unexpected answer: %s", u)
	}

	// Every refusal was counted under its reason.
	wantBad := float64(sent[0].Load() + sent[1].Load() + sent[2].Load())
	if got := csrErrors(ReasonBadCSR) - before[ReasonBadCSR]; got < wantBad {
		t.Errorf("ca_csr_errors_total{bad_csr} rose by %v, want at least %v", got, wantBad)
	}
	if got := csrErrors(ReasonUnauthenticated) - before[ReasonUnauthenticated]; got < float64(sent[3].Load()) {
		t.Errorf("ca_csr_errors_total{unauthenticated} rose by %v, want at least %v", got, sent[3].Load())
	}
	slices.Sort(latencies)
	t.Logf("flood: %d bad CSRs, %d unauthenticated requests, %d throttled; good callers served in median %s, max %s",
		int64(wantBad), sent[3].Load(), throttled.Load(), latencies[len(latencies)/2].Round(time.Millisecond), latencies[len(latencies)-1].Round(time.Millisecond))
}
