package gateway

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/policy"
)

func loadYAML(t *testing.T, yaml string) (*config, error) {
	t.Helper()
	return loadConfig([]manifest.File{{Name: "gw.yaml", Data: []byte(yaml)}}, workload{namespace: DefaultNamespace}, quietLog)
}

func TestLoadConfigReadsIstioManifests(t *testing.T) {
	files, err := manifest.ReadDir("testdata", "config")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig(files, workload{namespace: DefaultNamespace}, quietLog)
	if err != nil {
		t.Fatalf("load testdata: %v", err)
	}
	if got := cfg.sortedPorts(); !slices.Equal(got, []uint16{443, 8443, 9000}) {
		t.Fatalf("ports = %v, want 443 8443 9000", got)
	}
	if !cfg.ports[9000].tcp || cfg.ports[443].tcp {
		t.Error("port kinds: want 9000 TCP, 443 TLS")
	}
	want := map[string]bool{"shop-cert": false, "partners": true}
	if len(cfg.credentials) != len(want) || cfg.credentials["shop-cert"] != false || cfg.credentials["partners"] != true {
		t.Errorf("credentials = %v, want %v (true: needs a client CA)", cfg.credentials, want)
	}

	tests := []struct {
		port      uint16
		sni       string
		wantMode  tlsMode
		wantRoute string
		wantDests []string
	}{
		{443, "shop.example.com", modeSimple, "shop/shop", []string{"web.shop.svc.cluster.local:8080", "web-canary.shop:8080"}},
		{443, "db.example.com", modePassthrough, "istio-system/db", []string{"10.0.0.7:5432"}},
		{8443, "partners.example.com", modeMutual, "istio-system/partners", []string{"partners.api.svc.cluster.local:9090"}},
		// The shop service binds to the whole server, so its other host too.
		{443, "api.shop.example.com", modeSimple, "shop/shop", []string{"web.shop.svc.cluster.local:8080", "web-canary.shop:8080"}},
	}
	for _, tc := range tests {
		t.Run(tc.sni, func(t *testing.T) {
			s := cfg.ports[tc.port].server(tc.sni)
			if s == nil || s.mode != tc.wantMode {
				t.Fatalf("server for %s on %d = %+v, want mode %v", tc.sni, tc.port, s, tc.wantMode)
			}
			r := s.route(tc.port, tc.sni)
			if tc.wantRoute == "" {
				if r != nil {
					t.Fatalf("route %s, want none", r.name)
				}
				return
			}
			if r == nil || r.name != tc.wantRoute {
				t.Fatalf("route = %+v, want %s", r, tc.wantRoute)
			}
			var dests []string
			for _, d := range r.dests {
				dests = append(dests, d.addr)
			}
			if !slices.Equal(dests, tc.wantDests) {
				t.Errorf("destinations = %v, want %v", dests, tc.wantDests)
			}
		})
	}
	if _, r := cfg.ports[9000].tcpRoute(); r == nil || r.name != "istio-system/mq" {
		t.Errorf("TCP port 9000 route = %+v, want istio-system/mq", r)
	}
	if s := cfg.ports[443].server("evil.example.com"); s != nil {
		t.Errorf("evil.example.com matched server %s", s.name)
	}
}

func TestLoadConfigRejectsWithFileAndField(t *testing.T) {
	gw := func(server string) string {
		return "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  servers:\n" + server
	}
	vs := func(spec string) string {
		return gw("  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH}\n") +
			"---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: istio-system}\nspec:\n" + spec
	}
	tests := []struct {
		name string
		yaml string
		want []string // substrings of the error
	}{
		{"unknown field", gw("  - port: {number: 443, name: https, protocol: HTTPS}\n    hostz: [a.example.com]\n"),
			[]string{"gw.yaml: document 1 (Gateway istio-system/gw)", "spec.servers[0].hostz", "unknown field"}},
		{"TCP with tls", gw("  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: x}\n"),
			[]string{"spec.servers[0].tls", "TCP server takes no tls"}},
		{"bad port", gw("  - port: {number: 70000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"),
			[]string{"spec.servers[0].port.number"}},
		{"bad wildcard", gw("  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"a.*.example.com\"]\n"),
			[]string{"spec.servers[0].hosts[0]"}},
		{"TCP and TLS on one port", gw("  - port: {number: 443, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: PASSTHROUGH}\n"),
			[]string{"spec.servers[1]", "port 443 is TCP on one server and TLS on another"}},
		{"host served twice on a port", gw("  - port: {number: 443, name: a, protocol: TLS}\n    hosts: [a.example.com]\n    tls: {mode: PASSTHROUGH}\n  - port: {number: 443, name: b, protocol: TLS}\n    hosts: [a.example.com]\n    tls: {mode: PASSTHROUGH}\n"),
			[]string{"spec.servers[1]", `host "a.example.com" on port 443 is already served`}},
		{"TLS route without sniHosts", vs("  hosts: [\"*\"]\n  gateways: [gw]\n  tls:\n  - match: [{port: 443}]\n    route: [{destination: {host: a, port: {number: 1}}}]\n"),
			[]string{"spec.tls[0].match[0].sniHosts", "required"}},
		{"source labels", vs("  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - match: [{sourceLabels: {app: x}}]\n    route: [{destination: {host: a, port: {number: 1}}}]\n"),
			[]string{"spec.tcp[0].match[0].sourceLabels"}},
		{"SIMPLE without a certificate (Istio's validation)", gw("  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE}\n"),
			[]string{"spec.servers[0].tls.serverCertificate", "requires a server certificate"}},
		{"MUTUAL files without a client CA", gw("  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}\n"),
			[]string{"spec.servers[0].tls.caCertificates", "client CA bundle"}},
		{"two certificate sources", gw("  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: x, serverCertificate: /c.pem, privateKey: /k.pem}\n"),
			[]string{"spec.servers[0].tls", "only one of"}},
		{"CRL with SIMPLE", gw("  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, serverCertificate: /c.pem, privateKey: /k.pem, caCrl: /crl.pem}\n"),
			[]string{"spec.servers[0].tls.caCrl", "SIMPLE"}},
		{"plain HTTP with TLS settings", gw("  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: x}\n"),
			[]string{"spec.servers[0].tls", "plain-text HTTP"}},
		{"duplicate port names", gw("  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n  - port: {number: 9001, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"),
			[]string{"spec.servers[1].port.name", "unique"}},
		{"Gateway name with dots", strings.Replace(gw("  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"), "name: gw,", "name: gw.example,", 1),
			[]string{"metadata.name", "DNS label"}},
		{"VirtualService without routes", vs("  hosts: [\"*\"]\n  gateways: [gw]\n"),
			[]string{"(VirtualService istio-system/vs): spec: http, tcp or tls routes are required"}},
		{"SNI host outside the hosts", vs("  hosts: [a.example.com]\n  gateways: [gw]\n  tls:\n  - match: [{sniHosts: [b.example.com]}]\n    route: [{destination: {host: a, port: {number: 1}}}]\n"),
			[]string{"spec.tls[0].match[0].sniHosts[0]", "not within"}},
		{"wildcard SNI host wider than the hosts", vs("  hosts: [\"*.a.example.com\"]\n  gateways: [gw]\n  tls:\n  - match: [{sniHosts: [\"*.example.com\"]}]\n    route: [{destination: {host: a, port: {number: 1}}}]\n"),
			[]string{"spec.tls[0].match[0].sniHosts[0]", "not within"}},
		{"total weight 0", vs("  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: a, port: {number: 1}}}, {destination: {host: b, port: {number: 1}}}]\n"),
			[]string{"spec.tcp[0].route", "total destination weight = 0"}},
		{"YAML syntax", "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw\n", []string{"gw.yaml: document 1", "line"}},
		{"wrong version", "apiVersion: networking.istio.io/v2\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n", []string{"apiVersion", "v1, v1beta1"}},
		{"defined twice", gw("  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n") + "---\n" + gw("  - port: {number: 9001, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"),
			[]string{"document 2", "defined twice"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := loadYAML(t, tc.yaml)
			if err == nil {
				t.Fatal("loaded; want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestVirtualServiceBindsAsIstioDoes(t *testing.T) {
	base := `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ["shop/*.example.com"]
    tls: {mode: PASSTHROUGH}
---
`
	route := func(ns, gateways, sni, extra string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: " + ns + "}\nspec:\n  hosts: [\"*.example.com\"]\n  gateways: " + gateways +
			"\n  tls:\n  - match: [{port: 443, sniHosts: [\"" + sni + "\"]" + extra + "}]\n    route: [{destination: {host: a.internal, port: {number: 1}}}]\n"
	}
	tests := []struct {
		name    string
		vs      string
		sni     string
		wantHit bool
	}{
		{"namespace/name reference", route("shop", "[istio-system/gw]", "*.example.com", ""), "a.example.com", true},
		{"wildcard SNI covers deeper names", route("shop", "[istio-system/gw]", "*.example.com", ""), "a.b.example.com", true},
		{"wildcard does not cover the bare domain", route("shop", "[istio-system/gw]", "*.example.com", ""), "example.com", false},
		{"short reference is the service's namespace", route("shop", "[gw]", "*.example.com", ""), "a.example.com", false},
		{"server host namespace shuts out other namespaces", route("other", "[istio-system/gw]", "*.example.com", ""), "a.example.com", false},
		{"mesh only", route("shop", "[mesh]", "*.example.com", ""), "a.example.com", false},
		{"match limited to another gateway", route("shop", "[istio-system/gw]", "*.example.com", ", gateways: [istio-system/other]"), "a.example.com", false},
		{"exact SNI", route("shop", "[istio-system/gw]", "a.example.com", ""), "b.example.com", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := loadYAML(t, base+tc.vs)
			if err != nil {
				t.Fatal(err)
			}
			s := cfg.ports[443].server(tc.sni)
			hit := s != nil && s.route(443, tc.sni) != nil
			if hit != tc.wantHit {
				t.Errorf("route for %s: got %v, want %v", tc.sni, hit, tc.wantHit)
			}
		})
	}
}

func TestServerSelectionPrefersTheMostSpecificHost(t *testing.T) {
	cfg, err := loadYAML(t, `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  servers:
  - port: {number: 443, name: any, protocol: TLS}
    hosts: ["*"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: wide, protocol: TLS}
    hosts: ["*.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: narrow, protocol: TLS}
    hosts: ["*.api.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: exact, protocol: TLS}
    hosts: ["Login.API.example.com."]
    tls: {mode: PASSTHROUGH}
`)
	if err != nil {
		t.Fatal(err)
	}
	for sni, want := range map[string]string{
		"login.api.example.com": "exact",
		"v2.api.example.com":    "narrow",
		"api.example.com":       "wide",
		"www.example.com":       "wide",
		"example.org":           "any",
		"":                      "any",
	} {
		if s := cfg.ports[443].server(sni); s == nil || s.name != want {
			t.Errorf("SNI %q: server %+v, want %s", sni, s, want)
		}
	}
}

func TestGatewaySelectorChoosesTheWorkload(t *testing.T) {
	yaml := `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 9000, name: tcp, protocol: TCP}
    hosts: ["*"]
`
	files := []manifest.File{{Name: "gw.yaml", Data: []byte(yaml)}}
	for _, tc := range []struct {
		labels map[string]string
		want   int
	}{
		{nil, 1}, // selectors not checked
		{map[string]string{"istio": "ingressgateway"}, 1},
		{map[string]string{"istio": "egressgateway"}, 0},
	} {
		cfg, err := loadConfig(files, workload{namespace: DefaultNamespace, labels: tc.labels}, quietLog)
		if err != nil {
			t.Fatal(err)
		}
		if len(cfg.ports) != tc.want {
			t.Errorf("labels %v: %d ports, want %d", tc.labels, len(cfg.ports), tc.want)
		}
	}
}

func TestHostPatterns(t *testing.T) {
	tests := []struct {
		pattern, name string
		want          bool
	}{
		{"*", "anything.test", true},
		{"*", "", true},
		{"*.example.com", "a.example.com", true},
		{"*.example.com", "a.b.example.com", true},
		{"*.example.com", "example.com", false},
		{"*.example.com", "aexample.com", false},
		{"*.example.com", "", false},
		{"a.example.com", "a.example.com", true},
		{"a.example.com", "b.example.com", false},
	}
	for _, tc := range tests {
		if got := host(tc.pattern).matches(tc.name); got != tc.want {
			t.Errorf("%q matches %q = %v, want %v", tc.pattern, tc.name, got, tc.want)
		}
	}
	intersect := []struct {
		a, b string
		want bool
	}{
		{"*", "a.example.com", true},
		{"*.example.com", "*.a.example.com", true},
		{"*.example.com", "*.example.org", false},
		{"*.example.com", "a.example.com", true},
		{"a.example.com", "b.example.com", false},
	}
	for _, tc := range intersect {
		if got := host(tc.a).intersects(host(tc.b)); got != tc.want {
			t.Errorf("%q intersects %q = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestNewNamesTheBadFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "broken.yaml"), []byte("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n  servers:\n  - port: {number: 443, name: x, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: BOGUS}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	w := newWorld(t)
	_, err := New(w.identity(t, gatewayID), policy.Static(policy.Workload{Namespace: DefaultNamespace}), dir, t.TempDir(), WithLogger(quietLog), WithStrictConfig(true))
	if err == nil || !strings.Contains(err.Error(), "broken.yaml") || !strings.Contains(err.Error(), "spec.servers[0].tls.mode") {
		t.Fatalf("New: %v; want an error naming broken.yaml and spec.servers[0].tls.mode", err)
	}
}

// TestWhatTheGatewayDoesNotServeIsWarnedNotRefused: Istio accepts these, and
// the gateway applies the rest of the document without them (nothing is
// routed that was not asked for).
func TestWhatTheGatewayDoesNotServeIsWarnedNotRefused(t *testing.T) {
	gw := func(servers string) string {
		return "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  servers:\n" + servers
	}
	vs := func(spec string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: istio-system}\nspec:\n" + spec
	}
	gwTCP := "  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"
	tests := []struct {
		name, yaml, field string
		ports             int // listeners left
		routes            int // routes on port 9000
	}{
		{"OPTIONAL_MUTUAL server not bound", gw(gwTCP + "  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: OPTIONAL_MUTUAL, credentialName: x}\n"), "spec.servers[1]", 1, 0},
		{"HTTP server not bound", gw(gwTCP + "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"*\"]\n"), "spec.servers[1]", 1, 0},
		{"certificate file paths not bound", gw(gwTCP + "  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, serverCertificate: /etc/cert.pem, privateKey: /etc/key.pem}\n"), "spec.servers[1]", 1, 0},
		{"credential name escaping the directory not bound", gw(gwTCP + "  - port: {number: 443, name: tls, protocol: TLS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, credentialName: ../../etc/passwd}\n"), "spec.servers[1]", 1, 0},
		{"HTTP routes not used", gw(gwTCP) + "---\n" + vs("  hosts: [\"*\"]\n  gateways: [gw]\n  http:\n  - route: [{destination: {host: a}}]\n  tcp:\n  - route: [{destination: {host: a.example.com, port: {number: 1}}}]\n"), "spec.http", 1, 1},
		{"route without a port rejected alone", gw(gwTCP) + "---\n" + vs("  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: a.example.com}}]\n  - route: [{destination: {host: b.example.com, port: {number: 2}}}]\n"), "spec.tcp[0].route[0].destination.port.number", 1, 1},
		{"route with a subset rejected alone", gw(gwTCP) + "---\n" + vs("  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: a, subset: v1, port: {number: 1}}}]\n"), "spec.tcp[0].route[0].destination.subset", 1, 0},
		{"VirtualService of another gateway ignored, not validated", gw(gwTCP) + "---\n" + vs("  gateways: [other]\n  http:\n  - route: [{destination: {host: a}}]\n"), "spec.gateways", 1, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, warns, err := loadConfigWarn([]manifest.File{{Name: "gw.yaml", Data: []byte(tc.yaml)}}, workload{namespace: DefaultNamespace}, quietLog)
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			found := false
			for _, w := range warns {
				found = found || w.field == tc.field
			}
			if !found {
				t.Errorf("no warning on %s: %+v", tc.field, warns)
			}
			if len(cfg.ports) != tc.ports {
				t.Errorf("%d listeners, want %d", len(cfg.ports), tc.ports)
			}
			if pc := cfg.ports[9000]; pc == nil || len(pc.servers[0].routes) != tc.routes {
				t.Errorf("routes on 9000: %+v, want %d", pc, tc.routes)
			}
		})
	}
}

// TestDestinationPortFromTheService: a destination without a port takes
// the port of its Service when the configuration files carry that Service
// and it has exactly one port (short name, name.namespace and the
// .svc.cluster.local form alike); with several ports, or no Service, the
// route is rejected alone.
func TestDestinationPortFromTheService(t *testing.T) {
	const gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: istio-system}\nspec:\n  servers:\n  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: [\"*\"]\n"
	const services = `---
apiVersion: v1
kind: Service
metadata:
  name: one
  namespace: istio-system
  labels: {app: one}
spec:
  selector: {app: one}
  ports:
  - port: 7000
    targetPort: 8080
    protocol: TCP
---
apiVersion: v1
kind: Service
metadata: {name: two, namespace: istio-system}
spec:
  ports: [{name: a, port: 7001}, {name: b, port: 7002}]
`
	vs := func(host string) string {
		return "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: istio-system}\nspec:\n  hosts: [\"*\"]\n  gateways: [gw]\n  tcp:\n  - route: [{destination: {host: " + host + "}}]\n"
	}
	tests := []struct {
		host, want, reason string
	}{
		{"one", "one.istio-system:7000", ""},
		{"one.istio-system", "one.istio-system:7000", ""},
		{"one.istio-system.svc.cluster.local", "one.istio-system.svc.cluster.local:7000", ""},
		{"two", "", "Service two.istio-system has 2 ports"},
		{"three", "", "no Service three.istio-system"},
		{"one.other", "", "no Service one.other"},
	}
	for _, tc := range tests {
		t.Run(tc.host, func(t *testing.T) {
			cfg, warns, err := loadConfigWarn([]manifest.File{{Name: "gw.yaml", Data: []byte(gw + services + vs(tc.host))}}, workload{namespace: DefaultNamespace}, quietLog)
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			routes := cfg.ports[9000].servers[0].routes
			if tc.want != "" {
				if len(routes) != 1 || routes[0].dests[0].addr != tc.want {
					t.Fatalf("routes %+v, want one to %s (warnings %+v)", routes, tc.want, warns)
				}
				return
			}
			if len(routes) != 0 {
				t.Fatalf("route kept: %+v", routes[0].dests)
			}
			if !slices.ContainsFunc(warns, func(w warning) bool {
				return w.field == "spec.tcp[0].route[0].destination.port.number" && strings.Contains(w.msg, tc.reason)
			}) {
				t.Fatalf("no rejection naming %q: %+v", tc.reason, warns)
			}
		})
	}
}
