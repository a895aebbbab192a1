// Package serve is the start-up sequence the sidecar (meshproxy run) and the
// gateway (meshproxy gateway) share once their flags are checked: run the
// identity source's loop, build and start the data plane, serve the admin
// API, metrics and readiness endpoints, wait for the end (SIGTERM), and
// drain. One code path for both, so neither drops an error the other
// returns.
package serve

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/meshproxy/meshproxy/internal/memtrim"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// Off is the address value that disables an endpoint.
const Off = "off"

// Source is an identity source with a background loop (renewal, file or
// Workload API watch).
type Source interface {
	tlsmgr.Source
	Run(ctx context.Context) error
}

// Plane is a started sidecar or gateway, as the admin, metrics and health
// endpoints expose it.
type Plane interface {
	admin.Dataplane
	admin.Readiness
	Shutdown(ctx context.Context) error
}

// Built is what a command's build step returns: the started data plane,
// its own background loop (nil if it has none; a loop that fails ends Run
// with its error), and attributes for the started log line.
type Built struct {
	Plane Plane
	Loop  func(ctx context.Context) error
	Attrs []any
}

// Config is what the shared flags say.
type Config struct {
	Admin, Metrics, Health string        // addresses; Off disables one
	DrainTimeout           time.Duration // how long open connections may finish
	RotateInterval         time.Duration // least time between forced renewals (POST /rotate); 0: admin's default
	Logger                 *slog.Logger
	Started                string // the log message once everything listens
	// WrapHealth, if set, wraps the health handler (the sidecar adds the
	// application's rewritten probes under /app-health/).
	WrapHealth func(http.Handler) http.Handler
}

// Run runs src's loop, calls build (which starts the data plane), serves the
// endpoints and waits for ctx to end or the plane's loop to fail; then it
// drains the plane for up to DrainTimeout and closes the endpoints. It
// returns build's error, an endpoint that cannot bind (after shutting the
// plane down), or the loop's error; nil after a drain on ctx's end.
func Run(ctx context.Context, cfg Config, src Source, build func(ctx context.Context) (Built, error)) error {
	log := cfg.Logger
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	Background(ctx, log, "identity source stopped", src.Run)

	b, err := build(ctx)
	if err != nil {
		return err
	}
	dp := b.Plane
	var health http.Handler = admin.HealthHandler(dp)
	if cfg.WrapHealth != nil {
		health = cfg.WrapHealth(health)
	}
	servers, err := startHTTP(log, []endpoint{
		{"admin", cfg.Admin, admin.Handler(src, dp, admin.WithLogger(log), admin.WithRotateInterval(cfg.RotateInterval))},
		{"metrics", cfg.Metrics, metrics.Handler()},
		{"health", cfg.Health, health},
	})
	if err != nil {
		shutdownCtx, c := context.WithTimeout(context.Background(), time.Second)
		defer c()
		_ = dp.Shutdown(shutdownCtx)
		return err
	}
	log.Info(cfg.Started, append(b.Attrs, "admin", cfg.Admin, "metrics", cfg.Metrics, "health", cfg.Health)...)
	logIdentityReady(ctx, src, log)

	loopErr := make(chan error, 1)
	if b.Loop != nil {
		go func() { loopErr <- b.Loop(ctx) }()
	}
	var failed error
	select {
	case <-ctx.Done():
	case err := <-loopErr:
		if err != nil && ctx.Err() == nil {
			failed = err
			log.Error("data plane stopped", "err", err)
		} else {
			<-ctx.Done()
		}
	}

	log.Info("draining", "timeout", cfg.DrainTimeout)
	drainCtx, drainCancel := context.WithTimeout(context.Background(), cfg.DrainTimeout)
	defer drainCancel()
	err = dp.Shutdown(drainCtx)
	for _, s := range servers {
		_ = s.Close()
	}
	if err != nil {
		log.Warn("drain ended with connections still open", "err", err)
	}
	log.Info("stopped")
	if failed != nil {
		return fmt.Errorf("data plane: %w", failed)
	}
	return nil
}

// Background runs loop until ctx ends; an error other than ctx's end is
// logged as stopped.
func Background(ctx context.Context, log *slog.Logger, stopped string, loop func(ctx context.Context) error) {
	go func() {
		if err := loop(ctx); err != nil && !errors.Is(err, context.Canceled) {
			log.Error(stopped, "err", err)
		}
	}()
}

// logIdentityReady logs the identity once it is loaded, then releases the
// memory start-up used, and again whenever the process goes idle.
func logIdentityReady(ctx context.Context, src tlsmgr.Source, log *slog.Logger) {
	go func() {
		if err := tlsmgr.WaitReady(ctx, src); err == nil {
			st := src.Status()
			log.Info("identity ready", "spiffe_id", st.ID.String(), "serial", st.Serial, "not_after", st.NotAfter, "source", st.Source)
			if releaseMemory(log, "start-up") {
				releaseWhenIdle(ctx, log)
			}
		}
	}()
}

// Idle release: every idleCheck, a process that allocated less than
// idleQuiet in the last interval, after more than idleBusy or a garbage
// collection since its last release, releases again (memtrim.Idle): an idle
// sidecar gives back the garbage and the binary's pages of its last burst of
// connections, and those the runtime's periodic collection maps. An idle
// sidecar still answers Prometheus (a scrape allocates 0.06-0.26 MB, every
// 15 s in Istio's setup) and the kubelet's probes; one new mTLS connection
// allocates 200-250 KB, a burst of them hundreds of MB. A release costs a
// garbage collection and the page faults that bring back what it gave, about
// a millisecond: at most one an interval is nothing even when the process
// was not as idle as it looked.
const (
	idleCheck = 30 * time.Second
	idleQuiet = 2 << 20
	idleBusy  = 8 << 20
)

// releaseMemory gives back what the process used and does not use now
// (package memtrim): after start-up, and when it has gone idle. It reports
// whether that worked (where it does not, e.g. without /proc, the idle
// releases are not tried).
func releaseMemory(log *slog.Logger, after string) bool {
	r, err := memtrim.Trim()
	if err != nil {
		log.Warn("could not release "+after+" memory", "err", err)
		return false
	}
	log.Debug(after+" memory released", "executable_mappings", r.Mappings, "executable_resident_bytes", r.Bytes)
	return true
}

// releaseWhenIdle releases memory whenever the process goes quiet after
// work, until ctx ends.
func releaseWhenIdle(ctx context.Context, log *slog.Logger) {
	idle := memtrim.Idle{Quiet: idleQuiet, Busy: idleBusy}
	idle.Released(memtrim.Allocs())
	t := time.NewTicker(idleCheck)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if idle.Observe(memtrim.Allocs()) {
				releaseMemory(log, "idle")
				idle.Released(memtrim.Allocs())
			}
		}
	}
}

type endpoint struct {
	name, addr string
	handler    http.Handler
}

// startHTTP binds every enabled endpoint; on failure it closes what it
// opened.
func startHTTP(log *slog.Logger, specs []endpoint) ([]*http.Server, error) {
	var started []*http.Server
	for _, s := range specs {
		if s.addr == Off {
			continue
		}
		ln, err := net.Listen("tcp", s.addr)
		if err != nil {
			for _, o := range started {
				_ = o.Close()
			}
			return nil, fmt.Errorf("%s listener %s: %w", s.name, s.addr, err)
		}
		srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server stopped", "server", s.name, "err", err)
			}
		}()
		started = append(started, srv)
	}
	return started, nil
}
