package tlsmgr

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
)

func TestParseFederationEndpoint(t *testing.T) {
	other := spiffeid.RequireTrustDomainFromString("other.org")
	tests := []struct {
		spec    string
		url     string
		id      string // "" for https_web
		file    string
		wantErr string
	}{
		{spec: "other.org=https://b.example:8443/", url: "https://b.example:8443/"},
		{spec: "other.org=https://b.example:8443/@/etc/b/root-cert.pem", url: "https://b.example:8443/",
			id: "spiffe://other.org/ns/istio-system/sa/meshproxy-ca", file: "/etc/b/root-cert.pem"},
		{spec: "other.org=https://10.0.0.7:15443#spiffe://other.org/spire/server@b@home.json", url: "https://10.0.0.7:15443",
			id: "spiffe://other.org/spire/server", file: "b@home.json"},
		{spec: "https://b.example/", wantErr: "want TD=URL"},
		{spec: "other.org=", wantErr: "want TD=URL"},
		{spec: "Other Org=https://b/", wantErr: "trust domain"},
		{spec: "other.org=http://b.example/", wantErr: "want https://"},
		{spec: "other.org=https:///path", wantErr: "want https://"},
		{spec: "other.org=https://b.example/#spiffe://other.org/x", wantErr: "needs @BUNDLE-FILE"},
		{spec: "other.org=https://b.example/#spiffe://evil.org/x@f.pem", wantErr: "not in trust domain"},
		{spec: "other.org=https://b.example/#not-an-id@f.pem", wantErr: "endpoint SPIFFE ID"},
		{spec: "other.org=https://b.example/@", wantErr: "empty BUNDLE-FILE"},
	}
	for _, tc := range tests {
		t.Run(tc.spec, func(t *testing.T) {
			e, err := ParseFederationEndpoint(tc.spec)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want it to mention %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if e.TrustDomain != other || e.URL != tc.url || e.EndpointID.String() != tc.id && !(tc.id == "" && e.EndpointID.IsZero()) || e.BundleFile != tc.file {
				t.Fatalf("got %+v", e)
			}
			wantProfile := ProfileHTTPSSPIFFE
			if tc.id == "" {
				wantProfile = ProfileHTTPSWeb
			}
			if e.Profile() != wantProfile {
				t.Fatalf("profile %s, want %s", e.Profile(), wantProfile)
			}
		})
	}
}

func TestLoadBundleFileReadsPEMAndSPIFFEBundles(t *testing.T) {
	ca := testpki.New(t, "other.org")
	dir := t.TempDir()
	pemFile := filepath.Join(dir, "root-cert.pem")
	testpki.WriteFile(t, pemFile, testpki.PEMCerts(ca.Root))
	doc, err := spiffebundle.FromX509Authorities(ca.TrustDomain, []*x509.Certificate{ca.Root}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	jsonFile := filepath.Join(dir, "bundle.json")
	testpki.WriteFile(t, jsonFile, doc)
	for _, f := range []string{pemFile, jsonFile} {
		b, err := LoadBundleFile(ca.TrustDomain, f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if got := b.X509Authorities(); len(got) != 1 || !got[0].Equal(ca.Root) {
			t.Fatalf("%s: %d roots", f, len(got))
		}
	}
	leafFile := filepath.Join(dir, "leaf.pem")
	testpki.WriteFile(t, leafFile, testpki.PEMCerts(ca.Issue(t, "spiffe://other.org/x", time.Hour).Certificates[0]))
	for file, want := range map[string]string{
		leafFile:                         "not a CA",
		filepath.Join(dir, "nope.pem"):   "no such file",
		filepath.Join(dir, "empty.json"): "",
	} {
		if strings.HasSuffix(file, "empty.json") {
			testpki.WriteFile(t, file, []byte(`{"keys":[]}`))
		}
		if _, err := LoadBundleFile(ca.TrustDomain, file); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), file) {
			t.Errorf("%s: %v, want an error naming the file (and %q)", file, err, want)
		}
	}
}

// bundleEndpoint is a SPIFFE bundle endpoint (https_spiffe) on loopback,
// built from go-spiffe's own handler, whose bundle and health tests change.
type bundleEndpoint struct {
	url    string
	id     spiffeid.ID
	bundle atomic.Pointer[spiffebundle.Bundle]
	fail   atomic.Bool
	hits   atomic.Int64
}

func startBundleEndpoint(t *testing.T, ca *testpki.CA, hint time.Duration) *bundleEndpoint {
	t.Helper()
	be := &bundleEndpoint{id: spiffeid.RequireFromPath(ca.TrustDomain, DefaultBundleEndpointPath)}
	b := spiffebundle.FromX509Authorities(ca.TrustDomain, []*x509.Certificate{ca.Root})
	b.SetRefreshHint(hint)
	be.bundle.Store(b)
	h, err := federation.NewHandler(ca.TrustDomain, endpointSource{be})
	if err != nil {
		t.Fatal(err)
	}
	cert := testpki.TLSCertificate(ca.Issue(t, be.id.String(), time.Hour))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			be.hits.Add(1)
			if be.fail.Load() {
				http.Error(w, "down for the test", http.StatusServiceUnavailable)
				return
			}
			h.ServeHTTP(w, r)
		}),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
	}
	srv.SetKeepAlivesEnabled(false)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.ServeTLS(ln, "", "")
	}()
	t.Cleanup(func() {
		_ = srv.Close()
		<-done
	})
	be.url = "https://" + ln.Addr().String() + "/"
	return be
}

type endpointSource struct{ be *bundleEndpoint }

func (s endpointSource) GetBundleForTrustDomain(spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	return s.be.bundle.Load(), nil
}

// runFederated runs f until the test ends.
func runFederated(t *testing.T, f *Federated) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return")
		}
	})
}

func waitFor(t *testing.T, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after 20s: %v", what, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func rootsFor(f x509bundle.Source, td spiffeid.TrustDomain) ([]*x509.Certificate, error) {
	b, err := f.GetX509BundleForTrustDomain(td)
	if err != nil {
		return nil, err
	}
	return b.X509Authorities(), nil
}

func TestFederatedKeepsForeignBundleFreshAndKeepsItOnFailure(t *testing.T) {
	local := testpki.New(t, "cluster.local")
	foreign := testpki.New(t, "other.org")
	be := startBundleEndpoint(t, foreign, time.Second)
	static := NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour), local.Bundle())
	f, err := NewFederated(static, []FederationEndpoint{{
		TrustDomain: foreign.TrustDomain, URL: be.url, EndpointID: be.id, Bootstrap: foreign.Bundle(),
	}}, WithFederationLogger(testLogger(t, nil)), WithFederationBackoff(50*time.Millisecond, 200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	// Before any fetch the bootstrap bundle is trusted; the local one is the local source's.
	if roots, err := rootsFor(f, foreign.TrustDomain); err != nil || len(roots) != 1 || !roots[0].Equal(foreign.Root) {
		t.Fatalf("bootstrap bundle: %v %v", roots, err)
	}
	if roots, err := rootsFor(f, local.TrustDomain); err != nil || !roots[0].Equal(local.Root) {
		t.Fatalf("local bundle: %v %v", roots, err)
	}
	if _, err := f.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("unknown.org")); err == nil || !strings.Contains(err.Error(), "no X.509 bundle") {
		t.Fatalf("unknown trust domain: %v", err)
	}
	changed, unsubscribe := f.Subscribe()
	defer unsubscribe()
	gen0 := f.Generation()
	runFederated(t, f)

	// The foreign trust domain rotates its root: the new bundle arrives at the refresh hint.
	next := testpki.New(t, "other.org")
	b := spiffebundle.FromX509Authorities(foreign.TrustDomain, []*x509.Certificate{foreign.Root, next.Root})
	b.SetRefreshHint(time.Second)
	be.bundle.Store(b)
	waitFor(t, "the rotated foreign bundle is fetched", func() error {
		roots, err := rootsFor(f, foreign.TrustDomain)
		if err != nil {
			return err
		}
		if len(roots) != 2 {
			return fmt.Errorf("%d roots", len(roots))
		}
		return nil
	})
	if f.Generation() <= gen0 {
		t.Fatalf("generation %d did not grow from %d", f.Generation(), gen0)
	}
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("no change notification for the new foreign bundle")
	}
	st := f.Status()
	if len(st.TrustDomains) != 2 || st.TrustDomains[1] != foreign.TrustDomain || len(st.Bundles[1].X509Authorities()) != 2 {
		t.Fatalf("status trust domains %v", st.TrustDomains)
	}

	// The endpoint fails: the last bundle stays, the failures are counted.
	failures := func() float64 {
		return testutil.ToFloat64(metrics.FederationFetches.WithLabelValues("other.org", "failure"))
	}
	before := failures()
	be.fail.Store(true)
	hits := be.hits.Load()
	waitFor(t, "failed fetches counted", func() error {
		if failures() < before+2 || be.hits.Load() < hits+2 {
			return errors.New("not yet")
		}
		return nil
	})
	if roots, err := rootsFor(f, foreign.TrustDomain); err != nil || len(roots) != 2 {
		t.Fatalf("after failed fetches the last bundle must stay: %d roots, %v", len(roots), err)
	}
	be.fail.Store(false)
	waitFor(t, "fetching resumes", func() error {
		if testutil.ToFloat64(metrics.FederationLastSuccess.WithLabelValues("other.org")) < float64(time.Now().Add(-2*time.Second).Unix()) {
			return errors.New("no recent success")
		}
		return nil
	})
}

func TestFederatedRefusesAnEndpointWithTheWrongIdentity(t *testing.T) {
	foreign := testpki.New(t, "other.org")
	be := startBundleEndpoint(t, foreign, time.Second)
	local := testpki.New(t, "cluster.local")
	var logs syncBuffer
	f, err := NewFederated(NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour), local.Bundle()),
		[]FederationEndpoint{{TrustDomain: foreign.TrustDomain, URL: be.url,
			EndpointID: spiffeid.RequireFromPath(foreign.TrustDomain, "/not/the/endpoint"), Bootstrap: foreign.Bundle()}},
		WithFederationLogger(testLogger(t, &logs)), WithFederationBackoff(50*time.Millisecond, 100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	next := testpki.New(t, "other.org")
	be.bundle.Store(spiffebundle.FromX509Authorities(foreign.TrustDomain, []*x509.Certificate{next.Root}))
	runFederated(t, f)
	waitFor(t, "refusal logged", func() error {
		if !strings.Contains(logs.String(), "unexpected ID") {
			return errors.New("not yet")
		}
		return nil
	})
	// Nothing from an unauthenticated endpoint is trusted.
	if roots, _ := rootsFor(f, foreign.TrustDomain); len(roots) != 1 || !roots[0].Equal(foreign.Root) {
		t.Fatal("bundle from an endpoint with the wrong SPIFFE ID was installed")
	}
}

func TestFederatedCertificateDoesNotAllocate(t *testing.T) {
	local := testpki.New(t, "cluster.local")
	f, err := NewFederated(NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour), local.Bundle()),
		[]FederationEndpoint{{TrustDomain: spiffeid.RequireTrustDomainFromString("other.org"), URL: "https://127.0.0.1:1/"}})
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() {
		if _, err := f.Certificate(); err != nil {
			t.Fatal(err)
		}
		_ = f.Generation()
	}); n != 0 {
		t.Fatalf("Certificate+Generation allocate %v times", n)
	}
}

func TestNewFederatedRefusesBadEndpoints(t *testing.T) {
	local := testpki.New(t, "cluster.local")
	static := NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour), local.Bundle())
	other := spiffeid.RequireTrustDomainFromString("other.org")
	e := FederationEndpoint{TrustDomain: other, URL: "https://x/"}
	for name, eps := range map[string][]FederationEndpoint{
		"twice":                 {e, e},
		"spiffe w/o bootstrap":  {{TrustDomain: other, URL: "https://x/", EndpointID: spiffeid.RequireFromPath(other, "/e")}},
		"no url":                {{TrustDomain: other}},
		"no trust domain given": {{URL: "https://x/"}},
	} {
		if _, err := NewFederated(static, eps); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A federated source lets a server verify a client of the foreign trust
// domain; without federation the same client is refused.
func TestFederatedSourceVerifiesForeignPeers(t *testing.T) {
	local := testpki.New(t, "cluster.local")
	foreign := testpki.New(t, "other.org")
	static := NewStatic(local.Issue(t, "spiffe://cluster.local/ns/a/sa/server", time.Hour), local.Bundle())
	f, err := NewFederated(static, []FederationEndpoint{{TrustDomain: foreign.TrustDomain, URL: "https://127.0.0.1:1/",
		EndpointID: spiffeid.RequireFromPath(foreign.TrustDomain, DefaultBundleEndpointPath), Bootstrap: foreign.Bundle()}})
	if err != nil {
		t.Fatal(err)
	}
	client := NewStatic(foreign.Issue(t, "spiffe://other.org/ns/a/sa/client", time.Hour), foreign.Bundle(), local.Bundle())
	for name, tc := range map[string]struct {
		src  Source
		want bool
	}{"federated": {f, true}, "local only": {static, false}} {
		srv := startServer(t, ServerConfig(tc.src, nil))
		_, err := srv.roundTrip(ClientConfig(client, nil))
		if (err == nil) != tc.want {
			t.Errorf("%s: handshake error %v, want success %v", name, err, tc.want)
		}
	}
}

func TestLoadBootstrapNamesTheFile(t *testing.T) {
	e, err := ParseFederationEndpoint("other.org=https://b/@" + filepath.Join(t.TempDir(), "missing.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.LoadBootstrap(); err == nil || !strings.Contains(err.Error(), "missing.pem") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("LoadBootstrap: %v", err)
	}
}
