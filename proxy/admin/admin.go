package admin

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// DefaultRotateTimeout bounds a POST /rotate.
const DefaultRotateTimeout = 30 * time.Second

// Dataplane is what the admin API reads from the data plane; *proxy.Proxy
// implements it.
type Dataplane interface {
	Peers() []conntrack.PeerInfo
	Config() (mesh.Config, error)
}

// Identity is the body of GET /identity and POST /rotate.
type Identity struct {
	SPIFFEID         string    `json:"spiffe_id"`
	Serial           string    `json:"serial"`
	NotBefore        time.Time `json:"not_before"`
	NotAfter         time.Time `json:"not_after"`
	ExpiresInSeconds int64     `json:"expires_in_seconds"`
	ChainPEM         string    `json:"chain_pem"`
	TrustDomains     []string  `json:"trust_domains"`
	BundlePEM        string    `json:"bundle_pem"` // every trusted root, all trust domains
	Source           string    `json:"source"`
}

// Error is the body of every error response.
type Error struct {
	Error string `json:"error"`
}

// Option configures the admin handler.
type Option func(*options)

type options struct {
	log           *slog.Logger
	rotateTimeout time.Duration
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// WithRotateTimeout bounds a forced renewal (default 30s).
func WithRotateTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.rotateTimeout = d
		}
	}
}

// Handler returns the admin API for src's identity and dp's connections.
func Handler(src tlsmgr.Source, dp Dataplane, opts ...Option) http.Handler {
	o := options{log: slog.Default(), rotateTimeout: DefaultRotateTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	a := &api{src: src, dp: dp, opts: o, log: o.log.With("component", "admin")}
	mux := http.NewServeMux()
	mux.HandleFunc("/identity", a.identity)
	mux.HandleFunc("/peers", a.peers)
	mux.HandleFunc("/config", a.config)
	mux.HandleFunc("/rotate", a.rotate)
	mux.HandleFunc("/debug/pprof/", onlyGet(pprof.Index))
	mux.HandleFunc("/debug/pprof/cmdline", onlyGet(pprof.Cmdline))
	mux.HandleFunc("/debug/pprof/profile", onlyGet(pprof.Profile))
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol) // GET and POST by design
	mux.HandleFunc("/debug/pprof/trace", onlyGet(pprof.Trace))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint %s (have /identity, /peers, /config, /rotate, /debug/pprof/)", r.URL.Path))
	})
	return mux
}

type api struct {
	src  tlsmgr.Source
	dp   Dataplane
	opts options
	log  *slog.Logger
}

func (a *api) identity(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	a.writeIdentity(w)
}

func (a *api) writeIdentity(w http.ResponseWriter) {
	id, err := IdentityOf(a.src.Status(), time.Now())
	if err != nil {
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, id)
}

// IdentityOf renders a Source's status as the /identity body; it fails when
// no certificate is loaded.
func IdentityOf(st tlsmgr.Status, now time.Time) (Identity, error) {
	if st.ID.IsZero() || len(st.Chain) == 0 {
		msg := "no identity loaded"
		if st.LastError != "" {
			msg += ": " + st.LastError
		}
		return Identity{}, errors.New(msg)
	}
	var chain strings.Builder
	for _, c := range st.Chain {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	tds := make([]string, 0, len(st.TrustDomains))
	for _, td := range st.TrustDomains {
		tds = append(tds, td.String())
	}
	var bundle strings.Builder
	for _, b := range st.Bundles {
		for _, c := range b.X509Authorities() {
			_ = pem.Encode(&bundle, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		}
	}
	return Identity{
		SPIFFEID:         st.ID.String(),
		Serial:           st.Serial,
		NotBefore:        st.NotBefore.UTC(),
		NotAfter:         st.NotAfter.UTC(),
		ExpiresInSeconds: int64(st.NotAfter.Sub(now).Seconds()),
		ChainPEM:         chain.String(),
		TrustDomains:     tds,
		BundlePEM:        bundle.String(),
		Source:           st.Source,
	}, nil
}

func (a *api) peers(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	peers := a.dp.Peers()
	if peers == nil {
		peers = []conntrack.PeerInfo{}
	}
	writeJSON(w, http.StatusOK, peers)
}

func (a *api) config(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	cfg, err := a.dp.Config()
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, cfg)
}

func (a *api) rotate(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodPost) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), a.opts.rotateTimeout)
	defer cancel()
	a.log.Info("rotation requested", "remote", r.RemoteAddr)
	if err := a.src.Rotate(ctx); err != nil {
		a.log.Warn("rotation failed", "err", err)
		writeError(w, http.StatusBadGateway, fmt.Sprintf("rotate: %v", err))
		return
	}
	a.writeIdentity(w)
}

// Readiness says whether the sidecar is ready; *proxy.Proxy implements it.
type Readiness interface {
	Ready() error
}

// ReadyFunc adapts a function to Readiness.
type ReadyFunc func() error

// Ready calls f.
func (f ReadyFunc) Ready() error { return f() }

// HealthHandler serves /healthz/ready: 200 when r.Ready() returns nil, else
// 503 with the reason.
func HealthHandler(r Readiness) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", onlyGet(func(w http.ResponseWriter, _ *http.Request) {
		if err := r.Ready(); err != nil {
			writeError(w, http.StatusServiceUnavailable, "not ready: "+err.Error())
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "health is on /healthz/ready")
	})
	return mux
}

// allow answers 405 unless r uses one of methods.
func allow(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed on %s (use %s)", r.Method, r.URL.Path, strings.Join(methods, " or ")))
	return false
}

func onlyGet(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if allow(w, r, http.MethodGet, http.MethodHead) {
			h(w, r)
		}
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		writeError(w, http.StatusInternalServerError, fmt.Sprintf("encode response: %v", err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}

func writeError(w http.ResponseWriter, status int, msg string) {
	body, _ := json.Marshal(Error{Error: msg})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}
