package metrics_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/metrics"
)

func TestHandlerServesRegistryOnBothPaths(t *testing.T) {
	metrics.CACertsIssued.Inc()
	srv := httptest.NewServer(metrics.Handler())
	defer srv.Close()
	for _, path := range []string{"/stats/prometheus", "/metrics"} {
		code, body := get(t, http.MethodGet, srv.URL+path)
		if code != http.StatusOK {
			t.Errorf("GET %s = %d", path, code)
		}
		for _, want := range []string{"meshproxy_cert_expiry_timestamp_seconds", "meshproxy_ca_certs_issued_total", "go_goroutines"} {
			if !strings.Contains(body, want) {
				t.Errorf("GET %s lacks %s", path, want)
			}
		}
	}
}

func TestHandlerRefusesOtherPathsAndMethods(t *testing.T) {
	srv := httptest.NewServer(metrics.Handler())
	defer srv.Close()
	if code, body := get(t, http.MethodGet, srv.URL+"/stats"); code != http.StatusNotFound || !strings.Contains(body, `"error"`) {
		t.Errorf("GET /stats = %d %q, want 404 with a JSON error", code, body)
	}
	if code, body := get(t, http.MethodPost, srv.URL+"/metrics"); code != http.StatusMethodNotAllowed || !strings.Contains(body, "POST") {
		t.Errorf("POST /metrics = %d %q, want 405 naming the method", code, body)
	}
}

func get(t *testing.T, method, url string) (int, string) {
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
	return resp.StatusCode, string(body)
}
