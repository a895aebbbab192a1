package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/inject"
	"github.com/meshproxy/meshproxy/metrics"
)

const (
	alertsFile     = "observability/alerts.yaml"
	alertTestsFile = "observability/alerts_test.yaml"
	dashboardFile  = "observability/dashboard.json"
)

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (Debian package prometheus; .ci/run installs it): rules not checked")
	}
	return p
}

func TestAlertRulesPassPromtool(t *testing.T) {
	bin := promtool(t)
	if out, err := exec.Command(bin, "check", "rules", alertsFile).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	if out, err := exec.Command(bin, "test", "rules", alertTestsFile).CombinedOutput(); err != nil {
		t.Fatalf("promtool test rules: %v\n%s", err, out)
	}
}

// registeredMetrics are the metric names on metrics.Registry.
func registeredMetrics(t *testing.T) map[string]bool {
	t.Helper()
	ch := make(chan *prometheus.Desc, 256)
	go func() {
		metrics.Registry.Describe(ch)
		close(ch)
	}()
	re := regexp.MustCompile(`fqName: "([^"]+)"`)
	names := map[string]bool{}
	for d := range ch {
		if m := re.FindStringSubmatch(d.String()); m != nil {
			names[m[1]] = true
		}
	}
	if len(names) == 0 {
		t.Fatal("no metrics registered")
	}
	return names
}

var metricNameRe = regexp.MustCompile(`\bmeshproxy_[a-z0-9_]+`)

// checkMetricNames fails for meshproxy_ names in expr that nothing exports.
func checkMetricNames(t *testing.T, where, expr string, known map[string]bool) {
	t.Helper()
	for _, name := range metricNameRe.FindAllString(expr, -1) {
		base := name
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(name, suf); ok && known[b] {
				base = b
			}
		}
		switch {
		case known[base]:
		default:
			t.Errorf("%s: %s is not a meshproxy metric (metrics/metrics.go)", where, name)
		}
	}
}

func TestAlertRulesUseExportedMetrics(t *testing.T) {
	known := registeredMetrics(t)
	data, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var rf struct {
		Groups []struct {
			Name  string `json:"name"`
			Rules []struct {
				Alert       string            `json:"alert"`
				Expr        string            `json:"expr"`
				For         string            `json:"for,omitempty"`
				Labels      map[string]string `json:"labels"`
				Annotations map[string]string `json:"annotations"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.UnmarshalStrict(data, &rf); err != nil {
		t.Fatal(err)
	}
	var alerts []string
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			alerts = append(alerts, r.Alert)
			checkMetricNames(t, r.Alert, r.Expr, known)
			if s := r.Labels["severity"]; s != "warning" && s != "critical" {
				t.Errorf("%s: severity %q", r.Alert, s)
			}
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: summary and description annotations required", r.Alert)
			}
		}
	}
	for _, want := range []string{"MeshproxyCertNearExpiry", "MeshproxyCertRotationFailing", "MeshproxyCACSRErrors",
		"MeshproxyCARootExpiringSoon", "MeshproxyCARootExpiryImminent", "MeshproxyCAChainExpiringSoon", "MeshproxyCAChainExpiryImminent"} {
		if !slices.Contains(alerts, want) {
			t.Errorf("alert %s missing", want)
		}
	}
}

type grafanaPanel struct {
	Type    string         `json:"type"`
	Title   string         `json:"title"`
	Panels  []grafanaPanel `json:"panels"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

// TestDashboardQueriesParse checks every dashboard query with promtool (as
// recording rules, after substituting Grafana's variables) and against the
// exported metric names, and that the topics all have panels.
func TestDashboardQueriesParse(t *testing.T) {
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string         `json:"title"`
		UID    string         `json:"uid"`
		Panels []grafanaPanel `json:"panels"`
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if dash.Title == "" || dash.UID == "" {
		t.Error("dashboard needs a title and uid")
	}
	known := registeredMetrics(t)
	var exprs []string
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			walk(p.Panels)
			for _, tg := range p.Targets {
				exprs = append(exprs, tg.Expr)
				checkMetricNames(t, "panel "+p.Title, tg.Expr, known)
			}
		}
	}
	walk(dash.Panels)
	all := strings.Join(exprs, "\n")
	for _, m := range []string{"cert_expiry_timestamp_seconds", "cert_rotations_total", "handshakes_total",
		"connections_total", "bytes_total", "policy_denials_total", "ca_certs_issued_total", "ca_csr_errors_total"} {
		if !strings.Contains(all, "meshproxy_"+m) {
			t.Errorf("no panel shows meshproxy_%s", m)
		}
	}

	bin := promtool(t)
	var rules strings.Builder
	rules.WriteString("groups:\n- name: dashboard\n  rules:\n")
	vars := strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$namespace", ".*")
	for i, e := range exprs {
		q, err := json.Marshal(vars.Replace(e))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&rules, "  - record: dashboard:query_%d\n    expr: %s\n", i, q)
	}
	f := filepath.Join(t.TempDir(), "dashboard-rules.yaml")
	if err := os.WriteFile(f, []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "check", "rules", f).CombinedOutput(); err != nil {
		t.Fatalf("dashboard queries do not parse: %v\n%s", err, out)
	}
}

func TestMonitorsScrapeTheInjectedPorts(t *testing.T) {
	for _, d := range readFileDocs(t, "observability/monitors.yaml") {
		v, err := decodeStrict(d)
		if err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		m := v.(*monitorObject)
		switch d.kind {
		case "PodMonitor":
			if m.Spec.Selector.MatchLabels[inject.InjectedLabel] != "true" || !m.Spec.NamespaceSelector.Any {
				t.Errorf("%s: must select %s=true in every namespace", d, inject.InjectedLabel)
			}
			if len(m.Spec.PodMetricsEndpoints) != 1 || m.Spec.PodMetricsEndpoints[0].Port != inject.MetricsPortName ||
				m.Spec.PodMetricsEndpoints[0].Path != "/stats/prometheus" {
				t.Errorf("%s: endpoints %+v, want port %s path /stats/prometheus", d, m.Spec.PodMetricsEndpoints, inject.MetricsPortName)
			}
		case "ServiceMonitor":
			if len(m.Spec.Endpoints) != 1 || m.Spec.Endpoints[0].Port != "http-monitoring" {
				t.Errorf("%s: endpoints %+v, want the CA's http-monitoring port", d, m.Spec.Endpoints)
			}
		}
	}
}
