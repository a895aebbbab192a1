package admin

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
)

// Reasons of meshproxy_admin_requests_refused_total.
const (
	RefusedForeignHost     = "foreign_host"
	RefusedCrossOrigin     = "cross_origin"
	RefusedRotateThrottled = "rotate_throttled"
)

// DefaultRotateInterval is the least time between the starts of two forced
// renewals (POST /rotate); requests in between share the renewal in flight
// or are answered 429.
const DefaultRotateInterval = time.Second

// guard keeps browsers out of the admin API. Every request must name a
// loopback Host (or none), so a page whose name was rebound to 127.0.0.1
// cannot read or drive it; a mutating request (anything but GET, HEAD and
// OPTIONS) must carry no Origin but its own and no cross-site
// Sec-Fetch-Site, so a foreign page cannot make the browser post to it.
func guard(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reason, why := "", ""
		switch {
		case !loopbackHost(r.Host):
			reason, why = RefusedForeignHost, fmt.Sprintf("Host %q is not a loopback address: the admin API answers only requests made to 127.0.0.1, [::1] or localhost", r.Host)
		case mutating(r.Method) && !sameOrigin(r):
			reason, why = RefusedCrossOrigin, fmt.Sprintf("cross-site request refused (Origin %q, Sec-Fetch-Site %q): %s %s takes no requests from web pages",
				r.Header.Get("Origin"), r.Header.Get("Sec-Fetch-Site"), r.Method, r.URL.Path)
		}
		if reason != "" {
			metrics.AdminRefused.WithLabelValues(reason).Inc()
			log.Warn("admin request refused", "reason", reason, "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "host", r.Host)
			writeError(w, http.StatusForbidden, why)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func mutating(method string) bool {
	return method != http.MethodGet && method != http.MethodHead && method != http.MethodOptions
}

// loopbackHost accepts an empty Host, localhost, or a loopback IP, each
// with or without a port.
func loopbackHost(hostport string) bool {
	if hostport == "" {
		return true
	}
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")) // "[::1]" has no port
	return err == nil && ip.Unmap().IsLoopback()
}

// sameOrigin says whether r carries no Origin but the admin API's own and
// no cross-site fetch metadata. Command-line clients send neither.
func sameOrigin(r *http.Request) bool {
	switch r.Header.Get("Sec-Fetch-Site") {
	case "", "same-origin", "none":
	default:
		return false
	}
	o := r.Header.Get("Origin")
	if o == "" {
		return true
	}
	u, err := url.Parse(o)
	return err == nil && (u.Scheme == "http" || u.Scheme == "https") && r.Host != "" && u.Host == r.Host && loopbackHost(u.Host)
}

// rotateGate coalesces forced renewals: at most one in flight, and at most
// one started per interval. A request arriving while one is in flight
// waits for it and shares its result; one arriving within the interval
// after the last start is told when to retry.
type rotateGate struct {
	every time.Duration
	now   func() time.Time

	mu      sync.Mutex
	running *rotateCall
	last    time.Time // start of the latest renewal
}

type rotateCall struct {
	done chan struct{}
	err  error
}

// do runs rotate unless one is in flight (then it waits for that one) or one
// started less than the interval ago (then it returns how long to wait).
// The renewal runs under a context detached from the caller's, bounded by
// timeout, so a caller that gives up does not fail the others.
func (g *rotateGate) do(ctx context.Context, timeout time.Duration, rotate func(context.Context) error) (retryAfter time.Duration, err error) {
	g.mu.Lock()
	if c := g.running; c != nil {
		g.mu.Unlock()
		return 0, wait(ctx, c)
	}
	now := g.now()
	if since := now.Sub(g.last); !g.last.IsZero() && since < g.every {
		g.mu.Unlock()
		return g.every - since, nil
	}
	c := &rotateCall{done: make(chan struct{})}
	g.running, g.last = c, now
	g.mu.Unlock()

	go func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
		defer cancel()
		c.err = rotate(rctx)
		g.mu.Lock()
		g.running = nil
		g.mu.Unlock()
		close(c.done)
	}()
	return 0, wait(ctx, c)
}

func wait(ctx context.Context, c *rotateCall) error {
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return fmt.Errorf("waiting for the renewal in flight: %w", ctx.Err())
	}
}

// retryAfterSeconds is d rounded up to whole seconds, at least 1.
func retryAfterSeconds(d time.Duration) string {
	return strconv.FormatInt(max(int64((d+time.Second-1)/time.Second), 1), 10)
}
