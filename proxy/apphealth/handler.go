package apphealth

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshproxy/meshproxy/metrics"
)

// userAgent is sent on HTTP and gRPC probes unless the kubelet's own
// request (or the probe's headers) name one.
const userAgent = "kube-probe/meshproxy"

// maxBody is how much of a probe response is read, as the kubelet (10 KiB).
const maxBody = 10 << 10

// maxRedirects bounds the redirects an HTTP probe follows, as the kubelet.
const maxRedirects = 10

// Results of a probe, the result label of meshproxy_app_probes_total.
const (
	resultSuccess = "success"
	resultFailure = "failure"
	resultTimeout = "timeout"
)

// Option configures a Handler.
type Option func(*Handler)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(h *Handler) {
		if l != nil {
			h.log = l
		}
	}
}

// Handler serves /app-health/CONTAINER/KIND by running the configured
// probe against the application. It is safe for concurrent use.
type Handler struct {
	probers Probers
	log     *slog.Logger
	client  *http.Client
}

// New returns a Handler for probers (from Parse).
func New(probers Probers, opts ...Option) *Handler {
	h := &Handler{probers: probers, log: slog.Default()}
	for _, o := range opts {
		o(h)
	}
	h.log = h.log.With("component", "app-health")
	h.client = &http.Client{
		Transport: &http.Transport{
			Proxy:             nil, // never the environment's proxy: the target is this pod
			DisableKeepAlives: true,
			// The kubelet does not verify an HTTPS probe's certificate either.
			TLSClientConfig:    &tls.Config{InsecureSkipVerify: true},
			DisableCompression: true,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			// As the kubelet: follow redirects within the same host; a
			// redirect elsewhere counts as the 3xx it is (a success).
			if len(via) >= maxRedirects || req.URL.Hostname() != via[0].URL.Hostname() {
				return http.ErrUseLastResponse
			}
			return nil
		},
	}
	return h
}

// Wrap serves the probe paths (PathPrefix) with h and everything else
// with next. A nil h returns next unchanged.
func (h *Handler) Wrap(next http.Handler) http.Handler {
	if h == nil {
		return next
	}
	mux := http.NewServeMux()
	mux.Handle(PathPrefix, h)
	mux.Handle("/", next)
	return mux
}

// ServeHTTP runs the probe of r's path: 200 when it succeeds, 503 with the
// reason when it fails, 404 for a path with no probe.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, fmt.Sprintf("method %s not allowed on %s (use GET)", r.Method, r.URL.Path), http.StatusMethodNotAllowed)
		return
	}
	pr, ok := h.probers[r.URL.Path]
	if !ok {
		http.Error(w, fmt.Sprintf("no application probe configured for %s", r.URL.Path), http.StatusNotFound)
		return
	}
	kind := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
	timeout := time.Duration(pr.TimeoutSeconds) * time.Second
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	host := target(r)
	err := h.probe(ctx, r, host, pr)
	if err != nil {
		result := resultFailure
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded) {
			result = resultTimeout
			err = fmt.Errorf("no answer within the probe's timeout of %v: %w", timeout, err)
		}
		metrics.AppProbes.WithLabelValues(kind, result).Inc()
		h.log.Warn("application probe failed", "probe", r.URL.Path, "target", host.String(), "result", result, "err", err)
		http.Error(w, "application probe failed: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	metrics.AppProbes.WithLabelValues(kind, resultSuccess).Inc()
	h.log.Debug("application probe succeeded", "probe", r.URL.Path, "target", host.String())
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = io.WriteString(w, "ok\n")
}

// target is the address to probe: the local address the request arrived on
// (the pod IP when the kubelet asks), else loopback. It is always this pod.
func target(r *http.Request) netip.Addr {
	if a, ok := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr); ok {
		if ip := a.AddrPort().Addr().Unmap(); ip.IsValid() && !ip.IsUnspecified() {
			return ip
		}
	}
	return netip.AddrFrom4([4]byte{127, 0, 0, 1})
}

func (h *Handler) probe(ctx context.Context, r *http.Request, host netip.Addr, pr Prober) error {
	switch {
	case pr.HTTPGet != nil:
		return h.probeHTTP(ctx, r, host, pr.HTTPGet)
	case pr.TCPSocket != nil:
		return probeTCP(ctx, hostPort(host, pr.TCPSocket.Port))
	case pr.GRPC != nil:
		return probeGRPC(ctx, hostPort(host, pr.GRPC.Port), pr.GRPC.Service)
	}
	return errors.New("probe has no handler") // Parse never lets this through
}

func hostPort(host netip.Addr, port int32) string {
	if host.Zone() != "" {
		return net.JoinHostPort(host.String(), strconv.Itoa(int(port)))
	}
	return netip.AddrPortFrom(host, uint16(port)).String()
}

func (h *Handler) probeHTTP(ctx context.Context, in *http.Request, host netip.Addr, g *HTTPGet) error {
	scheme := "http"
	if g.Scheme == SchemeHTTPS {
		scheme = "https"
	}
	url := scheme + "://" + hostPort(host, g.Port) + g.Path
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fmt.Errorf("build request for %s: %w", url, err)
	}
	// What the kubelet sent, then the probe's own headers, as the kubelet
	// would have sent them to the app.
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set("Accept", "*/*")
	for _, k := range []string{"User-Agent", "Accept"} {
		if v := in.Header.Get(k); v != "" {
			req.Header.Set(k, v)
		}
	}
	set := map[string]bool{}
	for _, hd := range g.HTTPHeaders {
		if strings.EqualFold(hd.Name, "Host") {
			req.Host = hd.Value
			continue
		}
		k := http.CanonicalHeaderKey(hd.Name)
		if !set[k] { // the probe's headers replace the defaults, and repeat as given
			req.Header.Del(k)
			set[k] = true
		}
		req.Header.Add(k, hd.Value)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	if resp.StatusCode < http.StatusOK || resp.StatusCode >= http.StatusBadRequest {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	return nil
}

func probeTCP(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connect %s: %w", addr, err)
	}
	return c.Close()
}

func probeGRPC(ctx context.Context, addr string, service *string) error {
	conn, err := grpc.NewClient("passthrough:///"+addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUserAgent(userAgent))
	if err != nil {
		return fmt.Errorf("grpc client for %s: %w", addr, err)
	}
	defer conn.Close()
	req := &healthpb.HealthCheckRequest{}
	if service != nil {
		req.Service = *service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, req)
	if err != nil {
		return fmt.Errorf("grpc health check of %s (service %q): %w", addr, req.Service, err)
	}
	if s := resp.GetStatus(); s != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("grpc health check of %s (service %q): status %s", addr, req.Service, s)
	}
	return nil
}
