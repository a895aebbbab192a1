package serve

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// staticSource is a fixed identity whose loop waits for the end.
type staticSource struct{ *tlsmgr.Static }

func (staticSource) Run(ctx context.Context) error {
	<-ctx.Done()
	return ctx.Err()
}

func newSource(t *testing.T) staticSource {
	t.Helper()
	ca := testpki.New(t, "cluster.local")
	return staticSource{tlsmgr.NewStatic(ca.Issue(t, "spiffe://cluster.local/ns/default/sa/app", time.Hour), ca.Bundle())}
}

// buildProxy returns a build step starting a real sidecar with one explicit
// inbound listener on loopback; *started receives it.
func buildProxy(src tlsmgr.Source, started **proxy.Proxy, loop func(context.Context) error) func(context.Context) (Built, error) {
	return func(ctx context.Context) (Built, error) {
		p := proxy.New(src, policy.Static(policy.Workload{Namespace: "default"}),
			proxy.WithInboundExplicit("127.0.0.1:0", "127.0.0.1:9"))
		if err := p.Start(ctx); err != nil {
			return Built{}, err
		}
		*started = p
		return Built{Plane: p, Loop: loop}, nil
	}
}

func quietConfig() Config {
	return Config{Admin: Off, Metrics: Off, Health: Off, DrainTimeout: time.Second,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Started: "started"}
}

// The gateway's watch loop is the plane's Loop: when it fails, the process
// must end with that error (exit 1), not keep serving a stale config.
func TestLoopFailureEndsRunWithItsError(t *testing.T) {
	src := newSource(t)
	boom := errors.New("watch config dir: permission denied")
	var p *proxy.Proxy
	err := Run(context.Background(), quietConfig(), src, buildProxy(src, &p, func(context.Context) error { return boom }))
	if !errors.Is(err, boom) {
		t.Fatalf("Run = %v, want the loop's error", err)
	}
	if rerr := p.Ready(); rerr == nil {
		t.Error("the data plane is still ready after Run returned: it was not drained")
	}
}

func TestLoopEndingWithContextIsNotAnError(t *testing.T) {
	src := newSource(t)
	ctx, cancel := context.WithCancel(context.Background())
	var p *proxy.Proxy
	loop := func(ctx context.Context) error {
		cancel() // as SIGTERM would
		<-ctx.Done()
		return nil
	}
	if err := Run(ctx, quietConfig(), src, buildProxy(src, &p, loop)); err != nil {
		t.Fatalf("Run after the end of its context = %v, want nil", err)
	}
	if p.Ready() == nil {
		t.Error("the data plane is still ready after the drain")
	}
}

func TestEndpointsServeUntilCancelled(t *testing.T) {
	src := newSource(t)
	cfg := quietConfig()
	cfg.Health = freeAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	var p *proxy.Proxy
	var code int
	loop := func(context.Context) error {
		defer cancel()
		resp, err := http.Get("http://" + cfg.Health + "/healthz/ready")
		if err != nil {
			return err
		}
		code = resp.StatusCode
		return resp.Body.Close()
	}
	if err := Run(ctx, cfg, src, buildProxy(src, &p, loop)); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if code != http.StatusOK {
		t.Errorf("/healthz/ready while running = %d, want 200", code)
	}
	if c, err := net.Dial("tcp", cfg.Health); err == nil {
		_ = c.Close()
		t.Error("health endpoint still listening after Run returned")
	}
}

func TestEndpointThatCannotBindShutsThePlaneDown(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	src := newSource(t)
	cfg := quietConfig()
	cfg.Metrics = busy.Addr().String()
	var p *proxy.Proxy
	err = Run(context.Background(), cfg, src, buildProxy(src, &p, nil))
	if err == nil || !strings.Contains(err.Error(), "metrics listener") {
		t.Fatalf("Run = %v, want an error naming the metrics listener", err)
	}
	if p.Ready() == nil {
		t.Error("the data plane is still ready after its endpoint failed")
	}
}

func TestBuildErrorIsReturned(t *testing.T) {
	want := errors.New("--config-dir: no such directory")
	err := Run(context.Background(), quietConfig(), newSource(t), func(context.Context) (Built, error) { return Built{}, want })
	if !errors.Is(err, want) {
		t.Fatalf("Run = %v, want the build error", err)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// TestScrapesLeaveAnIdleSidecarIdle: Prometheus scraping an idle sidecar
// every 15 s (Istio's interval) must not look like work to the idle
// memory release, or a scraped sidecar never gives back the memory of its
// last burst of connections.
func TestScrapesLeaveAnIdleSidecarIdle(t *testing.T) {
	h := metrics.Handler()
	scrape := func() {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		if rec.Code != http.StatusOK || rec.Body.Len() == 0 {
			t.Fatalf("scrape: status %d, %d bytes", rec.Code, rec.Body.Len())
		}
	}
	scrape() // the first one sets up what the others reuse
	const n = 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		scrape()
	}
	runtime.ReadMemStats(&after)
	perScrape := (after.TotalAlloc - before.TotalAlloc) / n
	perInterval := perScrape * uint64(idleCheck/(15*time.Second))
	t.Logf("a scrape allocates %d KB; %d KB an idle interval", perScrape>>10, perInterval>>10)
	if perInterval >= idleQuiet/2 {
		t.Fatalf("scrapes every 15 s allocate %d KB an idle interval (%s): want well under the idle threshold, %d KB",
			perInterval>>10, idleCheck, idleQuiet>>10)
	}
}
