package admin_test

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const echoID = "spiffe://cluster.local/ns/default/sa/echo"

var quiet = slog.New(slog.DiscardHandler)

// fixture is a running proxy with an explicit inbound to an echo app, and
// its admin API.
type fixture struct {
	ca    *testpki.CA
	src   *tlsmgr.Static
	proxy *proxy.Proxy
	admin *httptest.Server
}

func newFixture(t *testing.T, src tlsmgr.Source) *fixture {
	t.Helper()
	ca := testpki.New(t, "cluster.local")
	static := tlsmgr.NewStatic(ca.Issue(t, echoID, time.Hour), ca.Bundle())
	if src == nil {
		src = static
	}
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			_, _ = io.Copy(c, c)
			c.Close()
		}
	}()
	t.Cleanup(func() { app.Close(); <-done })

	pol := policy.Static(policy.Workload{Namespace: "default"}, policy.WithDefaultMode(policy.ModePermissive))
	p := proxy.New(src, pol, proxy.WithLogger(quiet), proxy.WithInboundExplicit("127.0.0.1:0", app.Addr().String()))
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	srv := httptest.NewServer(admin.Handler(src, p, admin.WithLogger(quiet)))
	t.Cleanup(srv.Close)
	return &fixture{ca: ca, src: static, proxy: p, admin: srv}
}

func call(t *testing.T, method, url string, out any) (int, http.Header) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); method != http.MethodHead && !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s %s: content type %q, body %s", method, url, ct, body)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("%s %s: decode %s: %v", method, url, body, err)
		}
	}
	return resp.StatusCode, resp.Header
}

func TestIdentityDescribesTheLoadedSVID(t *testing.T) {
	f := newFixture(t, nil)
	var id admin.Identity
	if code, _ := call(t, http.MethodGet, f.admin.URL+"/identity", &id); code != http.StatusOK {
		t.Fatalf("status %d", code)
	}
	st := f.src.Status()
	if id.SPIFFEID != echoID || id.Serial != st.Serial || id.Source != "static" {
		t.Errorf("identity = %+v", id)
	}
	if !id.NotAfter.Equal(st.NotAfter) || !id.NotBefore.Equal(st.NotBefore) {
		t.Errorf("validity %v..%v, want %v..%v", id.NotBefore, id.NotAfter, st.NotBefore, st.NotAfter)
	}
	if id.ExpiresInSeconds <= 0 || id.ExpiresInSeconds > 3600 {
		t.Errorf("expires_in_seconds = %d", id.ExpiresInSeconds)
	}
	if len(id.TrustDomains) != 1 || id.TrustDomains[0] != "cluster.local" {
		t.Errorf("trust_domains = %v", id.TrustDomains)
	}
	rest := []byte(id.ChainPEM)
	var chain []*x509.Certificate
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	if len(chain) != 2 || !chain[0].Equal(st.Chain[0]) || !chain[1].Equal(f.ca.Intermediate) {
		t.Errorf("chain_pem holds %d certs, want leaf and intermediate", len(chain))
	}
}

func TestPeersListsOpenConnections(t *testing.T) {
	f := newFixture(t, nil)
	var peers []conntrack.PeerInfo
	if code, _ := call(t, http.MethodGet, f.admin.URL+"/peers", &peers); code != http.StatusOK || peers == nil || len(peers) != 0 {
		t.Fatalf("idle /peers = %d %v, want 200 []", code, peers)
	}
	c, err := net.Dial("tcp", f.proxy.Addrs()[0].String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		call(t, http.MethodGet, f.admin.URL+"/peers", &peers)
		if len(peers) == 1 && peers[0].BytesIn == 2 && peers[0].BytesOut == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/peers = %+v", peers)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p := peers[0]; p.Direction != "inbound" || p.Mode != "plaintext" || p.Source != c.LocalAddr().String() || p.PeerSPIFFEID != "" {
		t.Errorf("peer = %+v", p)
	}
}

func TestConfigShowsModeListenersAndPolicy(t *testing.T) {
	f := newFixture(t, nil)
	var cfg map[string]any
	if code, _ := call(t, http.MethodGet, f.admin.URL+"/config", &cfg); code != http.StatusOK {
		t.Fatalf("status %d", code)
	}
	if cfg["mode"] != "PERMISSIVE" || cfg["policy"] == nil || cfg["trust_domain"] != "cluster.local" {
		t.Errorf("config = %v", cfg)
	}
	ls, _ := cfg["listeners"].([]any)
	if len(ls) != 1 {
		t.Fatalf("listeners = %v", cfg["listeners"])
	}
	if l := ls[0].(map[string]any); l["kind"] != "inbound-explicit" || l["address"] != f.proxy.Addrs()[0].String() || l["mode"] != "PERMISSIVE" {
		t.Errorf("listener = %v", l)
	}
}

// failingRotation is a Source whose renewal fails, as when the CA is down.
type failingRotation struct{ *tlsmgr.Static }

func (failingRotation) Rotate(context.Context) error { return errors.New("ca unreachable") }

func TestRotate(t *testing.T) {
	f := newFixture(t, nil)
	var id admin.Identity
	if code, _ := call(t, http.MethodPost, f.admin.URL+"/rotate", &id); code != http.StatusOK || id.SPIFFEID != echoID {
		t.Fatalf("POST /rotate = %d %+v", code, id)
	}
	var e admin.Error
	code, hdr := call(t, http.MethodGet, f.admin.URL+"/rotate", &e)
	if code != http.StatusMethodNotAllowed || hdr.Get("Allow") != "POST" || e.Error == "" {
		t.Fatalf("GET /rotate = %d allow=%q %+v", code, hdr.Get("Allow"), e)
	}

	ca := testpki.New(t, "cluster.local")
	bad := newFixture(t, failingRotation{tlsmgr.NewStatic(ca.Issue(t, echoID, time.Hour), ca.Bundle())})
	if code, _ := call(t, http.MethodPost, bad.admin.URL+"/rotate", &e); code != http.StatusBadGateway || !strings.Contains(e.Error, "ca unreachable") {
		t.Fatalf("failed rotation = %d %+v", code, e)
	}
}

func TestMethodsAndPathsAreChecked(t *testing.T) {
	f := newFixture(t, nil)
	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{http.MethodPost, "/identity", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/peers", http.StatusMethodNotAllowed},
		{http.MethodPut, "/config", http.StatusMethodNotAllowed},
		{http.MethodGet, "/nope", http.StatusNotFound},
	} {
		var e admin.Error
		if code, _ := call(t, tc.method, f.admin.URL+tc.path, &e); code != tc.want || e.Error == "" {
			t.Errorf("%s %s = %d %+v, want %d with an error message", tc.method, tc.path, code, e, tc.want)
		}
	}
	resp, err := http.Get(f.admin.URL + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/debug/pprof/ = %d", resp.StatusCode)
	}
}

func TestMetricsOnBothPaths(t *testing.T) {
	srv := httptest.NewServer(metrics.Handler())
	defer srv.Close()
	for _, path := range []string{"/stats/prometheus", "/metrics"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "meshproxy_cert_expiry_timestamp_seconds") {
			t.Errorf("%s = %d, body without meshproxy metrics", path, resp.StatusCode)
		}
	}
}

func TestHealthFollowsProxyReadiness(t *testing.T) {
	f := newFixture(t, nil)
	srv := httptest.NewServer(admin.HealthHandler(f.proxy))
	defer srv.Close()
	if code, _ := call(t, http.MethodGet, srv.URL+"/healthz/ready", nil); code != http.StatusOK {
		t.Fatalf("started proxy: /healthz/ready = %d", code)
	}
	if err := f.proxy.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	var e admin.Error
	if code, _ := call(t, http.MethodGet, srv.URL+"/healthz/ready", &e); code != http.StatusServiceUnavailable || !strings.Contains(e.Error, "shutting down") {
		t.Fatalf("stopped proxy: /healthz/ready = %d %+v", code, e)
	}
}

func TestHealthReflectsReadiness(t *testing.T) {
	var ready atomic.Bool
	srv := httptest.NewServer(admin.HealthHandler(admin.ReadyFunc(func() error {
		if !ready.Load() {
			return errors.New("identity: no valid identity loaded")
		}
		return nil
	})))
	defer srv.Close()
	var e admin.Error
	if code, _ := call(t, http.MethodGet, srv.URL+"/healthz/ready", &e); code != http.StatusServiceUnavailable || !strings.Contains(e.Error, "no valid identity") {
		t.Fatalf("not ready = %d %+v", code, e)
	}
	ready.Store(true)
	if code, _ := call(t, http.MethodGet, srv.URL+"/healthz/ready", nil); code != http.StatusOK {
		t.Fatalf("ready = %d", code)
	}
}
