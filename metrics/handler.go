package metrics

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Paths are where Handler serves the registry: Istio's /stats/prometheus
// and the usual /metrics.
var paths = [...]string{"/stats/prometheus", "/metrics"}

// Handler serves Registry on /stats/prometheus and /metrics, for GET and
// HEAD; the sidecar, the gateway and the CA all use it. Other paths are 404
// and other methods 405, with a JSON {"error": ...} body saying why.
func Handler() http.Handler {
	h := promhttp.HandlerFor(Registry, promhttp.HandlerOpts{})
	mux := http.NewServeMux()
	for _, p := range paths {
		mux.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodGet && r.Method != http.MethodHead {
				w.Header().Set("Allow", "GET, HEAD")
				writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("method %s not allowed on %s (use GET or HEAD)", r.Method, r.URL.Path))
				return
			}
			h.ServeHTTP(w, r)
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) {
		writeError(w, http.StatusNotFound, "metrics are on /stats/prometheus and /metrics")
	})
	return mux
}

func writeError(w http.ResponseWriter, status int, msg string) {
	body, _ := json.Marshal(struct {
		Error string `json:"error"`
	}{msg})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
}
