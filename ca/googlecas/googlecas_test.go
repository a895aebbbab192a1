package googlecas_test

import (
	"context"
	"errors"
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
	"github.com/meshproxy/meshproxy/ca/catest"
	"github.com/meshproxy/meshproxy/ca/googlecas"
	"github.com/meshproxy/meshproxy/ca/googlecas/googlecastest"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

const clientID = "spiffe://cluster.local/ns/demo/sa/client"

// fixture is a fake CAS, a Signer for it and a meshproxy CA serving through
// that Signer on loopback.
type fixture struct {
	cas    *googlecastest.Server
	signer *googlecas.Signer
	auth   *ca.Authority
	addr   string
}

func newSigner(t *testing.T, cas *googlecastest.Server, opts ...googlecas.Option) (*googlecas.Signer, error) {
	t.Helper()
	opts = append([]googlecas.Option{googlecas.WithEndpoint(cas.Addr), googlecas.WithClientOptions(cas.ClientOptions()...),
		googlecas.WithLogger(catest.Quiet())}, opts...)
	s, err := googlecas.New(context.Background(), cas.Pool, opts...)
	if err == nil {
		t.Cleanup(s.Close)
	}
	return s, err
}

func newFixture(t *testing.T, opts ...googlecas.Option) *fixture {
	t.Helper()
	f := &fixture{}
	f.cas = googlecastest.Start(t, testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour))
	var err error
	if f.signer, err = newSigner(t, f.cas, opts...); err != nil {
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

// TestGoogleCASIssuesSVIDsForSidecars: a sidecar's Rotator gets a working
// SVID signed by the CA pool through the meshproxy CA, authenticated with
// Application Default Credentials, and CAS saw a certificate config with
// the CSR's key and the caller's SPIFFE ID.
func TestGoogleCASIssuesSVIDsForSidecars(t *testing.T) {
	template := "projects/meshproxy-test/locations/europe-west1/certificateTemplates/spiffe"
	f := newFixture(t, googlecas.WithTemplate(template), googlecas.WithCertificateAuthority("mesh-ca-1"))
	if roots := f.signer.Roots(); len(roots) != 1 || !roots[0].Equal(f.cas.PKI.Root) {
		t.Fatalf("roots read from the pool = %d certificates, want its root", len(roots))
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
	if st.ID.String() != clientID || len(st.Chain) != 2 || !st.Chain[1].Equal(f.cas.PKI.Intermediate) {
		t.Fatalf("SVID %s with %d certificates, want %s signed by the pool's CA", st.ID, len(st.Chain), clientID)
	}
	if b := st.Bundles; len(b) != 1 || !b[0].X509Authorities()[0].Equal(f.cas.PKI.Root) {
		t.Fatal("trust bundle is not the pool's root")
	}
	calls := f.cas.Calls()
	last := calls[len(calls)-1]
	cfg := last.GetCertificate().GetConfig()
	if uris := cfg.GetSubjectConfig().GetSubjectAltName().GetUris(); len(uris) != 1 || uris[0] != clientID {
		t.Errorf("requested URI SANs %v, want only %s", uris, clientID)
	}
	if last.GetCertificate().GetCertificateTemplate() != template || last.GetIssuingCertificateAuthorityId() != "mesh-ca-1" || last.GetParent() != f.cas.Pool {
		t.Errorf("template %q, CA %q, parent %q", last.GetCertificate().GetCertificateTemplate(), last.GetIssuingCertificateAuthorityId(), last.GetParent())
	}
	if life := last.GetCertificate().GetLifetime().AsDuration(); life < 24*time.Hour-time.Minute || life > 24*time.Hour {
		t.Errorf("lifetime %s, want the default 24h", life)
	}
	if dns := calls[0].GetCertificate().GetConfig().GetSubjectConfig().GetSubjectAltName().GetDnsNames(); !strings.Contains(strings.Join(dns, ","), "istiod.istio-system.svc") {
		t.Errorf("the CA's serving certificate was requested with DNS names %v", dns)
	}
	resp, err := f.create(t)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(resp.CertChain); n != 3 {
		t.Fatalf("cert_chain has %d elements, want leaf, intermediate, root", n)
	}
}

// TestGoogleCASRetriesQuotaExhaustion: ResourceExhausted is retried with
// the same request ID, so CAS issues one certificate.
func TestGoogleCASRetriesQuotaExhaustion(t *testing.T) {
	f := newFixture(t)
	f.cas.Throttle(2)
	before, issuedBefore := len(f.cas.Calls()), f.cas.Issued()
	if _, err := f.signWithin(t, 30*time.Second); err != nil {
		t.Fatalf("throttled twice: %v", err)
	}
	calls := f.cas.Calls()[before:]
	if len(calls) != 3 {
		t.Fatalf("CreateCertificate called %d times, want 3", len(calls))
	}
	if calls[0].GetRequestId() != calls[2].GetRequestId() || calls[0].GetCertificateId() != calls[2].GetCertificateId() {
		t.Error("retries carry another request ID: CAS would issue several certificates")
	}
	if n := f.cas.Issued() - issuedBefore; n != 1 {
		t.Errorf("%d certificates issued, want 1", n)
	}
}

// TestGoogleCASTemplateWithoutURISANIsRefused: a template that drops the
// SANs yields certificates without the SPIFFE ID; they are refused and
// counted.
func TestGoogleCASTemplateWithoutURISANIsRefused(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	f.cas.StripURISAN(true)
	before := catest.CSRErrors(ca.ReasonBackendInvalid)
	_, err := f.create(t)
	if status.Code(err) != codes.Internal {
		t.Fatalf("code = %v, want Internal: %v", status.Code(err), err)
	}
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "googlecas") || !strings.Contains(msg, "X.509-SVID") {
		t.Errorf("message does not say what CAS did wrong: %s", msg)
	}
	if got := catest.CSRErrors(ca.ReasonBackendInvalid) - before; got != 1 {
		t.Errorf("backend_invalid counted %v times, want 1", got)
	}
}

// TestGoogleCASErrorsAreClearStatuses: refusals are Internal with CAS's
// message; quota, unavailability and an unreachable endpoint are
// Unavailable once the deadline ends.
func TestGoogleCASErrorsAreClearStatuses(t *testing.T) {
	f := newFixture(t)
	f.serve(t)
	refusals := []error{
		status.Error(codes.PermissionDenied, "Permission 'privateca.certificates.create' denied on resource"),
		status.Error(codes.FailedPrecondition, "There are no enabled CAs in the CA pool"),
	}
	for _, e := range refusals {
		f.cas.Fail(e)
		before := catest.CSRErrors(ca.ReasonBackendError)
		_, err := f.create(t)
		if status.Code(err) != codes.Internal || !strings.Contains(status.Convert(err).Message(), status.Convert(e).Message()) {
			t.Errorf("%v: got %v, want Internal with CAS's message", e, err)
		}
		if got := catest.CSRErrors(ca.ReasonBackendError) - before; got != 1 {
			t.Errorf("backend_error counted %v times, want 1", got)
		}
	}
	f.cas.Fail(nil)
	for name, setup := range map[string]func(){
		"quota":       func() { f.cas.Throttle(1 << 20) },
		"unavailable": func() { f.cas.Fail(status.Error(codes.Unavailable, "The service is currently unavailable.")) },
	} {
		setup()
		_, err := f.signWithin(t, 2*time.Second)
		if !errors.Is(err, ca.ErrBackendUnavailable) {
			t.Errorf("%s: err = %v, want ErrBackendUnavailable", name, err)
		}
		f.cas.Throttle(0)
		f.cas.Fail(nil)
	}
	f.cas.Stop()
	if _, err := f.signWithin(t, 2*time.Second); !errors.Is(err, ca.ErrBackendUnavailable) {
		t.Errorf("stopped: err = %v, want ErrBackendUnavailable", err)
	}
}

// TestGoogleCASCredentialsAreChecked: the fake verifies the service
// account's JWT, so a key it does not know fails at start.
func TestGoogleCASCredentialsAreChecked(t *testing.T) {
	cas := googlecastest.Start(t, testpki.New(t, "cluster.local"))
	other := googlecastest.Start(t, testpki.New(t, "cluster.local")) // now ADC names other's account key
	_ = other
	_, err := newSigner(t, cas)
	if !errors.Is(err, ca.ErrBackendRefused) || !strings.Contains(err.Error(), "Unauthenticated") {
		t.Fatalf("err = %v, want Unauthenticated", err)
	}
}

func TestNewValidatesSettings(t *testing.T) {
	cas := googlecastest.Start(t, testpki.New(t, "cluster.local"))
	tests := []struct {
		name, pool string
		opts       []googlecas.Option
		want       string
	}{
		{"bad pool", "mesh", nil, "want projects/"},
		{"bad template", cas.Pool, []googlecas.Option{googlecas.WithTemplate("spiffe")}, "certificateTemplates"},
		{"bad CA", cas.Pool, []googlecas.Option{googlecas.WithCertificateAuthority("a/b")}, "CA's ID"},
		{"unknown pool", strings.Replace(cas.Pool, "mesh", "other", 1), nil, "NotFound"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := append([]googlecas.Option{googlecas.WithEndpoint(cas.Addr), googlecas.WithClientOptions(cas.ClientOptions()...),
				googlecas.WithLogger(catest.Quiet())}, tt.opts...)
			s, err := googlecas.New(context.Background(), tt.pool, opts...)
			if err == nil {
				s.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
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
