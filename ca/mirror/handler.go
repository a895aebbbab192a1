package mirror

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/metrics"
)

// Path is the URL path of the config endpoint.
const Path = "/v1/istio-config"

// Long-poll bounds: a request waits at most MaxWait for a newer version.
const (
	DefaultWait = 30 * time.Second
	MaxWait     = 60 * time.Second
)

// Response is the body of a 200 answer: the mirror's version and the
// documents of the caller's namespace and the root namespace.
type Response struct {
	Version    uint64            `json:"version"`
	Namespaces []string          `json:"namespaces"`
	Documents  []json.RawMessage `json:"documents"`
}

// handler serves the mirror to workloads.
type handler struct {
	m       *Mirror
	bundles x509bundle.Source
	rootNS  string
	log     *slog.Logger
	now     func() time.Time
}

// HandlerOption configures NewHandler.
type HandlerOption func(*handler)

// WithRootNamespace sets the namespace whose documents every workload sees
// (default istio-system).
func WithRootNamespace(ns string) HandlerOption { return func(h *handler) { h.rootNS = ns } }

// WithHandlerLogger sets the handler's logger (default slog.Default()).
func WithHandlerLogger(l *slog.Logger) HandlerOption { return func(h *handler) { h.log = l } }

// NewHandler serves GET Path?version=N&wait=D. The caller must present an
// X.509-SVID (TLS client certificate) that verifies against bundles and
// names a workload spiffe://TD/ns/NS/sa/SA; it receives the documents of NS
// and of the root namespace, nothing else. With version equal to the
// mirror's, the answer waits up to wait (default DefaultWait, at most
// MaxWait) for a change and is 304 Not Modified if none came. Until the
// mirror has synced every resource the answer is 503 with the reason, so a
// sidecar keeps what it has instead of applying an empty policy.
func NewHandler(m *Mirror, bundles x509bundle.Source, opts ...HandlerOption) http.Handler {
	h := &handler{m: m, bundles: bundles, rootNS: "istio-system", log: slog.Default(), now: time.Now}
	for _, o := range opts {
		o(h)
	}
	for _, r := range []string{"served", "not_modified", "unauthenticated", "forbidden", "not_ready", "bad_request", "too_large"} {
		metrics.MirrorRequests.WithLabelValues(r)
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+Path, h)
	return mux
}

func (h *handler) refuse(w http.ResponseWriter, r *http.Request, code int, result string, err error, id spiffeid.ID) {
	metrics.MirrorRequests.WithLabelValues(result).Inc()
	attrs := []any{"result", result, "code", code, "peer", r.RemoteAddr, "err", err.Error()}
	if !id.IsZero() {
		attrs = append(attrs, "spiffe_id", id.String())
	}
	level := slog.LevelWarn
	if result == "not_ready" {
		level = slog.LevelInfo
	}
	h.log.Log(r.Context(), level, "istio config request refused", attrs...)
	w.Header().Set("Connection", "close")
	http.Error(w, err.Error(), code)
}

// namespaceOf returns NS of a workload ID /ns/NS/sa/SA.
func namespaceOf(id spiffeid.ID) (string, error) {
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" || seg[1] == "" || seg[3] == "" {
		return "", fmt.Errorf("%s is not a workload identity (want spiffe://TD/ns/NS/sa/SA)", id)
	}
	return seg[1], nil
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		h.refuse(w, r, http.StatusUnauthorized, "unauthenticated", errors.New("a client X.509-SVID is required"), spiffeid.ID{})
		return
	}
	id, _, err := x509svid.Verify(r.TLS.PeerCertificates, h.bundles, x509svid.WithTime(h.now()))
	if err != nil {
		h.refuse(w, r, http.StatusUnauthorized, "unauthenticated", fmt.Errorf("client certificate: %w", err), spiffeid.ID{})
		return
	}
	ns, err := namespaceOf(id)
	if err != nil {
		h.refuse(w, r, http.StatusForbidden, "forbidden", err, id)
		return
	}
	q := r.URL.Query()
	var have uint64
	if v := q.Get("version"); v != "" {
		if have, err = strconv.ParseUint(v, 10, 64); err != nil {
			h.refuse(w, r, http.StatusBadRequest, "bad_request", fmt.Errorf("version %q: want a non-negative integer", v), id)
			return
		}
	}
	wait := DefaultWait
	if v := q.Get("wait"); v != "" {
		if wait, err = time.ParseDuration(v); err != nil || wait < 0 {
			h.refuse(w, r, http.StatusBadRequest, "bad_request", fmt.Errorf("wait %q: want a duration such as 30s", v), id)
			return
		}
		wait = min(wait, MaxWait)
	}

	cur := h.m.Current()
	if cur.Err == nil && have == cur.Version && wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-cur.Changed:
		case <-t.C:
		case <-r.Context().Done():
		}
		t.Stop()
		cur = h.m.Current()
	}
	if cur.Err != nil {
		h.refuse(w, r, http.StatusServiceUnavailable, "not_ready", cur.Err, id)
		return
	}
	if have == cur.Version {
		metrics.MirrorRequests.WithLabelValues("not_modified").Inc()
		w.WriteHeader(http.StatusNotModified)
		return
	}
	namespaces := []string{ns}
	if h.rootNS != ns {
		namespaces = append(namespaces, h.rootNS)
	}
	docs, version := h.m.Documents(namespaces...)
	resp := Response{Version: version, Namespaces: namespaces, Documents: make([]json.RawMessage, len(docs))}
	size := 0
	for i, d := range docs {
		resp.Documents[i] = d.JSON
		size += len(d.JSON) + len(DocumentSeparator)
	}
	if size > manifest.MaxFileSize {
		h.refuse(w, r, http.StatusInternalServerError, "too_large",
			fmt.Errorf("the config of namespaces %s is %d bytes, more than the %d a sidecar loads", strings.Join(namespaces, ", "), size, manifest.MaxFileSize), id)
		return
	}
	body, err := json.Marshal(resp)
	if err != nil {
		h.refuse(w, r, http.StatusInternalServerError, "too_large", fmt.Errorf("encode response: %w", err), id)
		return
	}
	metrics.MirrorRequests.WithLabelValues("served").Inc()
	h.log.Debug("istio config served", "spiffe_id", id.String(), "version", version, "documents", len(docs))
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

// DocumentSeparator separates documents in the YAML stream a client
// writes; JSON documents are YAML.
const DocumentSeparator = "\n---\n"
