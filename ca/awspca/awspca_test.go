package awspca_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/awspca"
	"github.com/meshproxy/meshproxy/ca/awspca/awspcatest"
	"github.com/meshproxy/meshproxy/ca/catest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

const clientID = "spiffe://cluster.local/ns/demo/sa/client"

// fixture is a fake private CA, a Signer for it and a meshproxy CA serving
// through that Signer on loopback.
type fixture struct {
	pca    *awspcatest.Server
	signer *awspca.Signer
	auth   *ca.Authority
	addr   string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{}
	f.pca = awspcatest.Start(t, testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour))
	var err error
	f.signer, err = awspca.New(context.Background(), f.pca.CAARN, awspca.WithEndpoint(f.pca.URL), awspca.WithLogger(catest.Quiet()))
	if err != nil {
		t.Fatal(err)
	}
	if f.auth, err = ca.NewFromSigner(f.signer); err != nil {
		t.Fatal(err)
	}
	return f
}

// serve starts the meshproxy CA over the fixture's signer.
func (f *fixture) serve(t *testing.T) {
	t.Helper()
	f.addr = catest.ServeTokens(t, f.auth, "client-token "+clientID)
}

func (f *fixture) create(t *testing.T) (*pb.IstioCertificateResponse, error) {
	t.Helper()
	return catest.Create(t, f.addr, f.auth.Roots(), "client-token")
}

func (f *fixture) signWithin(t *testing.T, d time.Duration) (*tlsmgr.Issued, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return f.auth.SignChain(ctx, catest.NewCSR(t), spiffeid.RequireFromString(clientID), time.Hour)
}

// TestAWSPCAIssuesSVIDsForSidecars: a sidecar's Rotator gets a working SVID
// signed by the private CA through the meshproxy CA, and the private CA saw
// exactly the request of its API, SigV4-signed for the CA's region.
func TestAWSPCAIssuesSVIDsForSidecars(t *testing.T) {
	f := newFixture(t)
	if roots := f.signer.Roots(); len(roots) != 1 || !roots[0].Equal(f.pca.PKI.Root) {
		t.Fatalf("roots read from the CA's chain = %d certificates, want its root", len(roots))
	}
	f.serve(t)
	client, err := caclient.New(f.addr, caclient.WithRoots(f.auth.Roots()...), caclient.WithServerName("localhost"),
		caclient.WithTokenFile(tokenFile(t, "client-token")))
	if err != nil {
		t.Fatal(err)
	}
	r, err := tlsmgr.NewRotator(client, tlsmgr.WithLogger(catest.Quiet()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := r.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.Status()
	if st.ID.String() != clientID || len(st.Chain) != 2 || !st.Chain[1].Equal(f.pca.PKI.Intermediate) {
		t.Fatalf("SVID %s with %d certificates, want %s signed by the private CA", st.ID, len(st.Chain), clientID)
	}
	if b := st.Bundles; len(b) != 1 || !b[0].X509Authorities()[0].Equal(f.pca.PKI.Root) {
		t.Fatal("trust bundle is not the private CA's root")
	}
	if life := st.Chain[0].NotAfter.Sub(st.Chain[0].NotBefore); life < 24*time.Hour || life > 24*time.Hour+3*time.Minute {
		t.Errorf("certificate lives %s, want the default 24h from the request's validity", life)
	}

	issues := f.pca.Calls("IssueCertificate")
	last := issues[len(issues)-1]
	if last.Region != awspcatest.Region {
		t.Errorf("signed for region %q, want the ARN's %q", last.Region, awspcatest.Region)
	}
	if last.Input["TemplateArn"] != awspca.DefaultTemplateARN || last.Input["SigningAlgorithm"] != "SHA256WITHECDSA" {
		t.Errorf("template %v, algorithm %v", last.Input["TemplateArn"], last.Input["SigningAlgorithm"])
	}
	sans := last.Input["ApiPassthrough"].(map[string]any)["Extensions"].(map[string]any)["SubjectAlternativeNames"].([]any)
	if len(sans) != 1 || sans[0].(map[string]any)["UniformResourceIdentifier"] != clientID {
		t.Errorf("API passthrough SANs = %v, want only the URI %s", sans, clientID)
	}
	if v := last.Input["Validity"].(map[string]any); v["Type"] != "ABSOLUTE" || int64(v["Value"].(float64)) != st.Chain[0].NotAfter.Unix() {
		t.Errorf("Validity %v, want ABSOLUTE at the certificate's NotAfter", v)
	}
	serving := issues[0].Input["ApiPassthrough"].(map[string]any)["Extensions"].(map[string]any)["SubjectAlternativeNames"].([]any)
	var dns []string
	for _, s := range serving {
		if n, ok := s.(map[string]any)["DnsName"].(string); ok {
			dns = append(dns, n)
		}
	}
	if !strings.Contains(strings.Join(dns, ","), "istiod.istio-system.svc") {
		t.Errorf("the CA's serving certificate was requested with DNS names %v", dns)
	}

	// The response is istiod's: leaf, the private CA, its root.
	resp, err := f.create(t)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.CertChain); n != 3 {
		t.Fatalf("cert_chain has %d elements, want leaf, intermediate, root", n)
	}
}

// TestAWSPCARetriesThrottlingAndPendingIssuance: ThrottlingException on
// IssueCertificate and RequestInProgressException on GetCertificate are
// what a busy private CA answers; the signer waits them out with the same
// idempotency token, so one certificate is issued.
func TestAWSPCARetriesThrottlingAndPendingIssuance(t *testing.T) {
	f := newFixture(t)
	f.pca.Throttle(2)
	f.pca.InProgress(2)
	before := len(f.pca.Calls("IssueCertificate"))
	issued, err := f.signWithin(t, 30*time.Second)
	if err != nil {
		t.Fatalf("throttled, then pending: %v", err)
	}
	if issued.Chain[0].URIs[0].String() != clientID {
		t.Fatalf("issued for %v", issued.Chain[0].URIs)
	}
	issues := f.pca.Calls("IssueCertificate")[before:]
	if len(issues) != 3 {
		t.Fatalf("IssueCertificate called %d times, want 3 (two throttled)", len(issues))
	}
	if tok := issues[0].Input["IdempotencyToken"]; issues[1].Input["IdempotencyToken"] != tok || issues[2].Input["IdempotencyToken"] != tok {
		t.Error("retries of one request carry different idempotency tokens: AWS would issue several certificates")
	}
	gets := f.pca.Calls("GetCertificate")
	if n := len(gets); n < 3 {
		t.Errorf("GetCertificate called %d times, want it polled past the 2 in-progress answers", n)
	}
}

// TestAWSPCATemplateWithoutURISANIsRefused: a template that drops the
// passthrough SANs yields certificates without the SPIFFE ID; the CA
// refuses them, says why, and counts it.
func TestAWSPCATemplateWithoutURISANIsRefused(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	f.pca.StripURISAN(true)
	before := catest.CSRErrors(ca.ReasonBackendInvalid)
	_, err := f.create(t)
	if status.Code(err) != codes.Internal {
		t.Fatalf("code = %v, want Internal: %v", status.Code(err), err)
	}
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "awspca") || !strings.Contains(msg, "X.509-SVID") {
		t.Errorf("message does not say what the private CA did wrong: %s", msg)
	}
	if got := catest.CSRErrors(ca.ReasonBackendInvalid) - before; got != 1 {
		t.Errorf("backend_invalid counted %v times, want 1", got)
	}
	f.pca.StripURISAN(false)
	if _, err := f.create(t); err != nil {
		t.Fatalf("passthrough template: %v", err)
	}
}

// TestAWSPCARefusalsAreInternal: an answer that is a refusal decides the
// status sidecars see, with AWS's code and message in it.
func TestAWSPCARefusalsAreInternal(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	tests := []struct {
		name string
		err  *awspcatest.APIError
	}{
		{"access denied", &awspcatest.APIError{Status: http.StatusBadRequest, Code: "AccessDeniedException",
			Message: "User: arn:aws:sts::111122223333:assumed-role/meshproxy is not authorized to perform: acm-pca:IssueCertificate"}},
		{"CA disabled", &awspcatest.APIError{Status: http.StatusBadRequest, Code: "InvalidStateException",
			Message: "The certificate authority is in the DISABLED state"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.pca.Fail(tt.err)
			defer f.pca.Fail(nil)
			before := catest.CSRErrors(ca.ReasonBackendError)
			_, err := f.create(t)
			if status.Code(err) != codes.Internal {
				t.Fatalf("code = %v, want Internal: %v", status.Code(err), err)
			}
			if msg := status.Convert(err).Message(); !strings.Contains(msg, tt.err.Code) || !strings.Contains(msg, tt.err.Message) {
				t.Errorf("message %q does not carry AWS's answer", msg)
			}
			if got := catest.CSRErrors(ca.ReasonBackendError) - before; got != 1 {
				t.Errorf("backend_error counted %v times, want 1", got)
			}
		})
	}
}

// TestAWSPCAUnavailableWithinDeadline: a private CA that keeps throttling,
// fails inside, or cannot be reached is ErrBackendUnavailable once the
// request's deadline ends, with AWS's message.
func TestAWSPCAUnavailableWithinDeadline(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name  string
		setup func()
		want  string
	}{
		{"throttled", func() { f.pca.Throttle(1 << 20) }, "Rate exceeded"},
		{"internal failure", func() {
			f.pca.Fail(&awspcatest.APIError{Status: http.StatusInternalServerError, Code: "InternalFailure", Message: "We encountered an internal error."})
		}, "internal error"},
		{"unreachable", func() { f.pca.Close() }, "connect"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.setup()
			defer f.pca.Throttle(0)
			defer f.pca.Fail(nil)
			_, err := f.signWithin(t, 2*time.Second)
			if !errors.Is(err, ca.ErrBackendUnavailable) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrBackendUnavailable with %q", err, tt.want)
			}
		})
	}
}

// TestAWSPCASigV4IsVerified: the fake checks signatures like AWS, so a
// wrong secret key fails at start with AWS's message.
func TestAWSPCASigV4IsVerified(t *testing.T) {
	pca := awspcatest.Start(t, testpki.New(t, "cluster.local"))
	t.Setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
	_, err := awspca.New(context.Background(), pca.CAARN, awspca.WithEndpoint(pca.URL), awspca.WithLogger(catest.Quiet()))
	if !errors.Is(err, ca.ErrBackendRefused) || !strings.Contains(err.Error(), "signature we calculated does not match") {
		t.Fatalf("err = %v, want a refused signature", err)
	}
}

func TestNewValidatesSettings(t *testing.T) {
	pca := awspcatest.Start(t, testpki.New(t, "cluster.local"))
	ctx := context.Background()
	tests := []struct {
		name, arn string
		opts      []awspca.Option
		want      string
	}{
		{"not an ARN", "my-ca", nil, "want arn:aws:acm-pca"},
		{"another service", "arn:aws:kms:eu-west-1:111122223333:key/1", nil, "want arn:aws:acm-pca"},
		{"bad template", pca.CAARN, []awspca.Option{awspca.WithTemplateARN("EndEntity")}, "template ARN"},
		{"http endpoint", pca.CAARN, []awspca.Option{awspca.WithEndpoint("http://127.0.0.1:1")}, "want https://"},
		{"unknown CA", strings.Replace(pca.CAARN, "1111-2222", "9999-2222", 1), nil, "ResourceNotFoundException"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := append([]awspca.Option{awspca.WithEndpoint(pca.URL), awspca.WithLogger(catest.Quiet())}, tt.opts...)
			_, err := awspca.New(ctx, tt.arn, opts...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
	pca.ChainIncludesRoot(false)
	if _, err := awspca.New(ctx, pca.CAARN, awspca.WithEndpoint(pca.URL), awspca.WithLogger(catest.Quiet())); err == nil || !strings.Contains(err.Error(), "no root") {
		t.Fatalf("chain without root: %v", err)
	}
	other := testpki.New(t, "cluster.local")
	s, err := awspca.New(ctx, pca.CAARN, awspca.WithEndpoint(pca.URL), awspca.WithRoots(other.Root), awspca.WithLogger(catest.Quiet()))
	if err != nil {
		t.Fatalf("pinned root: %v", err)
	}
	if r := s.Roots(); len(r) != 1 || !r[0].Equal(other.Root) {
		t.Fatal("WithRoots not used")
	}
}

// tokenFile writes token to a file for a CA client.
func tokenFile(t *testing.T, token string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
