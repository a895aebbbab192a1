package apphealth

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshproxy/meshproxy/metrics"
)

// portOf is the port of a listener address.
func portOf(t *testing.T, addr net.Addr) int32 {
	t.Helper()
	return int32(addr.(*net.TCPAddr).Port)
}

// closedPort is a loopback port nothing listens on.
func closedPort(t *testing.T) int32 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := portOf(t, ln.Addr())
	ln.Close()
	return p
}

// serveProbes runs a Handler for probers (validated by Parse) the way the
// sidecar does, on loopback, and returns its URL.
func serveProbes(t *testing.T, probers Probers) string {
	t.Helper()
	js, err := probers.JSON()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := Parse([]byte(js))
	if err != nil {
		t.Fatalf("Parse(%s): %v", js, err)
	}
	next := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "sidecar ready") })
	srv := httptest.NewServer(New(parsed).Wrap(next))
	t.Cleanup(srv.Close)
	return srv.URL
}

// get fetches url and returns the status and body.
func get(t *testing.T, method, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("User-Agent", "kube-probe/1.33")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestHTTPProbeRunsTheOriginalRequestAgainstTheApp(t *testing.T) {
	type seen struct{ path, host, ua, token string }
	got := make(chan seen, 10)
	var status atomic.Int32
	status.Store(http.StatusOK)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.URL.RequestURI(), r.Host, r.Header.Get("User-Agent"), r.Header.Get("X-Probe-Token")}
		w.WriteHeader(int(status.Load()))
	}))
	defer app.Close()
	port := portOf(t, app.Listener.Addr())
	url := serveProbes(t, Probers{
		Path("web", Readiness): {HTTPGet: &HTTPGet{Path: "/healthz?full=1", Port: port, HTTPHeaders: []HTTPHeader{
			{Name: "X-Probe-Token", Value: "t0k"}, {Name: "Host", Value: "web.example"},
		}}},
		Path("web", Liveness): {HTTPGet: &HTTPGet{Port: port}},
	})

	if code, body := get(t, http.MethodGet, url+Path("web", Readiness)); code != http.StatusOK {
		t.Fatalf("readyz with a healthy app: %d %q", code, body)
	}
	if s := <-got; s != (seen{"/healthz?full=1", "web.example", "kube-probe/1.33", "t0k"}) {
		t.Errorf("the app saw %+v: want the original path, Host header, the kubelet's User-Agent and the probe's header", s)
	}
	if code, _ := get(t, http.MethodGet, url+Path("web", Liveness)); code != http.StatusOK {
		t.Errorf("livez with a healthy app: %d", code)
	}
	if s := <-got; s.path != "/" {
		t.Errorf("an empty path probes /, the app saw %q", s.path)
	}

	before := testutil.ToFloat64(metrics.AppProbes.WithLabelValues(Readiness, resultFailure))
	status.Store(http.StatusInternalServerError)
	code, body := get(t, http.MethodGet, url+Path("web", Readiness))
	<-got
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "status 500") {
		t.Errorf("readyz with a failing app: %d %q, want 503 naming the app's status", code, body)
	}
	if after := testutil.ToFloat64(metrics.AppProbes.WithLabelValues(Readiness, resultFailure)); after != before+1 {
		t.Errorf("meshproxy_app_probes_total{probe=readyz,result=failure} went %v -> %v", before, after)
	}

	// 3xx is a success, as for the kubelet.
	status.Store(http.StatusNotModified)
	if code, _ := get(t, http.MethodGet, url+Path("web", Readiness)); code != http.StatusOK {
		t.Errorf("readyz with a 304 from the app: %d, want 200", code)
	}
	<-got

	app.Close()
	if code, body := get(t, http.MethodGet, url+Path("web", Liveness)); code != http.StatusServiceUnavailable || !strings.Contains(body, "refused") {
		t.Errorf("livez with the app gone: %d %q, want 503 saying the connection was refused", code, body)
	}
}

func TestHTTPProbeFollowsRedirectsOnlyWithinThePod(t *testing.T) {
	var elsewhere atomic.Int32
	other := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { elsewhere.Add(1) }))
	defer other.Close()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/old":
			http.Redirect(w, r, "/new", http.StatusFound)
		case "/new":
			w.WriteHeader(http.StatusServiceUnavailable)
		case "/away":
			// Another host: localhost is not 127.0.0.1.
			http.Redirect(w, r, "http://localhost:"+fmt.Sprint(portOf(t, other.Listener.Addr()))+"/", http.StatusFound)
		}
	}))
	defer app.Close()
	port := portOf(t, app.Listener.Addr())
	url := serveProbes(t, Probers{
		Path("app", Readiness): {HTTPGet: &HTTPGet{Path: "/old", Port: port}},
		Path("app", Liveness):  {HTTPGet: &HTTPGet{Path: "/away", Port: port}},
	})
	if code, body := get(t, http.MethodGet, url+Path("app", Readiness)); code != http.StatusServiceUnavailable || !strings.Contains(body, "status 503") {
		t.Errorf("a redirect within the pod is followed: %d %q, want the target's 503", code, body)
	}
	if code, _ := get(t, http.MethodGet, url+Path("app", Liveness)); code != http.StatusOK {
		t.Errorf("a redirect to another host counts as its 3xx: %d, want 200", code)
	}
	if n := elsewhere.Load(); n != 0 {
		t.Errorf("the probe followed a redirect out of the pod (%d requests)", n)
	}
}

func TestHTTPSProbeSkipsCertificateVerification(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			w.WriteHeader(http.StatusBadRequest)
		}
	}))
	defer app.Close()
	url := serveProbes(t, Probers{Path("app", Startup): {HTTPGet: &HTTPGet{Path: "/", Port: portOf(t, app.Listener.Addr()), Scheme: "https"}}})
	if code, body := get(t, http.MethodGet, url+Path("app", Startup)); code != http.StatusOK {
		t.Errorf("HTTPS probe of an app with a self-signed certificate: %d %q", code, body)
	}
}

func TestHTTPProbeTimesOut(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	defer app.Close()
	url := serveProbes(t, Probers{Path("app", Readiness): {HTTPGet: &HTTPGet{Port: portOf(t, app.Listener.Addr())}, TimeoutSeconds: 1}})
	before := testutil.ToFloat64(metrics.AppProbes.WithLabelValues(Readiness, resultTimeout))
	code, body := get(t, http.MethodGet, url+Path("app", Readiness))
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "timeout") {
		t.Errorf("an app that never answers: %d %q, want 503 naming the timeout", code, body)
	}
	if after := testutil.ToFloat64(metrics.AppProbes.WithLabelValues(Readiness, resultTimeout)); after != before+1 {
		t.Errorf("timeouts counted %v -> %v", before, after)
	}
}

func TestTCPProbeConnects(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
			accepted <- struct{}{}
		}
	}()
	url := serveProbes(t, Probers{
		Path("db", Liveness):  {TCPSocket: &TCPSocket{Port: portOf(t, ln.Addr())}},
		Path("db", Readiness): {TCPSocket: &TCPSocket{Port: closedPort(t)}},
	})
	if code, body := get(t, http.MethodGet, url+Path("db", Liveness)); code != http.StatusOK {
		t.Errorf("TCP probe of a listening app: %d %q", code, body)
	}
	<-accepted
	if code, body := get(t, http.MethodHead, url+Path("db", Readiness)); code != http.StatusServiceUnavailable {
		t.Errorf("TCP probe of a closed port: %d %q, want 503", code, body)
	}
}

func TestGRPCProbeUsesTheHealthCheckingProtocol(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(ln) }()
	defer srv.Stop()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_NOT_SERVING)
	port := portOf(t, ln.Addr())
	orders, unknown := "orders", "nope"
	url := serveProbes(t, Probers{
		Path("api", Liveness):  {GRPC: &GRPC{Port: port}},
		Path("api", Readiness): {GRPC: &GRPC{Port: port, Service: &orders}},
		Path("api", Startup):   {GRPC: &GRPC{Port: port, Service: &unknown}},
		Path("down", Liveness): {GRPC: &GRPC{Port: closedPort(t)}},
	})
	if code, body := get(t, http.MethodGet, url+Path("api", Liveness)); code != http.StatusOK {
		t.Errorf("gRPC probe of a serving server: %d %q", code, body)
	}
	if code, body := get(t, http.MethodGet, url+Path("api", Readiness)); code != http.StatusServiceUnavailable || !strings.Contains(body, "NOT_SERVING") {
		t.Errorf("gRPC probe of a NOT_SERVING service: %d %q", code, body)
	}
	if code, body := get(t, http.MethodGet, url+Path("api", Startup)); code != http.StatusServiceUnavailable || !strings.Contains(body, "NotFound") {
		t.Errorf("gRPC probe of an unknown service: %d %q", code, body)
	}
	hs.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	if code, body := get(t, http.MethodGet, url+Path("api", Readiness)); code != http.StatusOK {
		t.Errorf("gRPC probe once the service serves: %d %q", code, body)
	}
	if code, body := get(t, http.MethodGet, url+Path("down", Liveness)); code != http.StatusServiceUnavailable {
		t.Errorf("gRPC probe of a closed port: %d %q", code, body)
	}
}

func TestOnlyConfiguredProbesRun(t *testing.T) {
	var hits atomic.Int32
	app := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) }))
	defer app.Close()
	url := serveProbes(t, Probers{Path("app", Readiness): {HTTPGet: &HTTPGet{Port: portOf(t, app.Listener.Addr())}}})
	for _, path := range []string{
		Path("app", Liveness),
		Path("other", Readiness),
		"/app-health/app/readyz/extra",
		"/app-health/",
		"/app-health/app/readyz%2F..%2F..%2Fhealthz",
	} {
		if code, body := get(t, http.MethodGet, url+path); code != http.StatusNotFound {
			t.Errorf("GET %s: %d %q, want 404", path, code, body)
		}
	}
	if code, _ := get(t, http.MethodPost, url+Path("app", Readiness)); code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d, want 405", code)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the app was called %d times for probes that are not configured", n)
	}
	// Everything outside /app-health/ is the sidecar's own health handler.
	if code, body := get(t, http.MethodGet, url+"/healthz/ready"); code != http.StatusOK || body != "sidecar ready" {
		t.Errorf("/healthz/ready: %d %q", code, body)
	}
}

func TestTargetIsThePodAddressTheRequestArrivedOn(t *testing.T) {
	for _, tc := range []struct {
		local net.Addr
		want  string
	}{
		{&net.TCPAddr{IP: net.ParseIP("10.1.2.3"), Port: 15021}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:10.1.2.3"), Port: 15021}, "10.1.2.3"},
		{&net.TCPAddr{IP: net.ParseIP("fd00::5"), Port: 15021}, "fd00::5"},
		{&net.TCPAddr{IP: net.IPv4zero, Port: 15021}, "127.0.0.1"},
		{nil, "127.0.0.1"},
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		if tc.local != nil {
			r = r.WithContext(context.WithValue(r.Context(), http.LocalAddrContextKey, tc.local))
		}
		if got := target(r).String(); got != tc.want {
			t.Errorf("local %v: target %s, want %s", tc.local, got, tc.want)
		}
	}
}

func TestWrapWithoutProbesIsTheHealthHandler(t *testing.T) {
	next := http.NewServeMux()
	var h *Handler
	if got := h.Wrap(next); got != http.Handler(next) {
		t.Error("a nil Handler must leave the health handler as it is")
	}
}
