package policy

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/meshproxy/meshproxy/metrics"
)

func authzDoc(name, ns, annotations, body string) string {
	meta := "metadata:\n  name: " + name + "\n"
	if ns != "" {
		meta += "  namespace: " + ns + "\n"
	}
	if annotations != "" {
		meta += "  annotations:\n" + annotations
	}
	return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n" + meta + "spec:\n" + body
}

const dryRunTrue = "    istio.io/dry-run: \"true\"\n"

// TestDryRunChangesNothingAndIsCounted is the security fix of issue 14: an
// istio.io/dry-run policy is never enforced, only evaluated and counted.
func TestDryRunChangesNothingAndIsCounted(t *testing.T) {
	wl := Workload{Namespace: "foo", Labels: map[string]string{"app": "httpbin"}}
	const frontend = "spiffe://cluster.local/ns/foo/sa/frontend"
	dryAllow := authzDoc("dry-allow", "foo", dryRunTrue, "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]\n")
	dryDeny := authzDoc("dry-deny", "foo", dryRunTrue, "  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n")
	counter := func(policy, result string) float64 {
		return testutil.ToFloat64(metrics.AuthzDryRun.WithLabelValues(policy, result))
	}
	st, err := loadYAML(t, wl, docs(dryAllow, dryDeny))
	if err != nil {
		t.Fatal(err)
	}
	snap := st.Current()
	beforeAllowDeny, beforeDenyDeny := counter("foo/dry-allow", "deny"), counter("foo/dry-deny", "deny")
	beforeAllowAllow := counter("foo/dry-allow", "allow")
	// Without the dry-run annotation, the ALLOW policy would refuse 9000
	// and the DENY policy would refuse 9000 too: both must change nothing.
	for _, port := range []uint16{80, 9000, 8080} {
		d := snap.Authorize(Request{Peer: id(t, frontend), Port: port})
		if !d.Allowed || d.Reason != ReasonAllowed {
			t.Errorf("port %d: %+v; dry-run policies must not decide", port, d)
		}
		if len(d.DryRun) != 2 {
			t.Fatalf("port %d: dry-run results %+v, want both policies", port, d.DryRun)
		}
	}
	if got := counter("foo/dry-allow", "allow") - beforeAllowAllow; got != 1 {
		t.Errorf("dry-run ALLOW would-allow count = %v, want 1 (port 80)", got)
	}
	if got := counter("foo/dry-allow", "deny") - beforeAllowDeny; got != 2 {
		t.Errorf("dry-run ALLOW would-deny count = %v, want 2 (ports 9000, 8080)", got)
	}
	if got := counter("foo/dry-deny", "deny") - beforeDenyDeny; got != 1 {
		t.Errorf("dry-run DENY would-deny count = %v, want 1 (port 9000)", got)
	}

	// Istio's dry-run-mix: dry-run ALLOW on 80 and enforced ALLOW on 9000:
	// port 80 is denied (the dry-run ALLOW does not allow it).
	mix := docs(
		authzDoc("httpbin-1", "foo", dryRunTrue, "  selector:\n    matchLabels:\n      app: httpbin\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]\n"),
		authzDoc("httpbin-2", "foo", "    istio.io/dry-run: \"false\"\n", "  selector:\n    matchLabels:\n      app: httpbin\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: [\"9000\"]\n"))
	cfg := Load([]File{{Name: "mix.yaml", Data: []byte(mix)}}, wl, quiet)
	if cfg.Documents[0].Result != ResultDryRun || cfg.Documents[1].Result != ResultApplied {
		t.Errorf("results %q, %q; want dry-run, applied", cfg.Documents[0].Result, cfg.Documents[1].Result)
	}
	snap = NewSnapshot(cfg, wl, quiet)
	if d := snap.Authorize(Request{Peer: id(t, frontend), Port: 80}); d.Allowed {
		t.Errorf("port 80 allowed by a dry-run ALLOW: %+v", d)
	}
	if d := snap.Authorize(Request{Peer: id(t, frontend), Port: 9000}); !d.Allowed {
		t.Errorf("port 9000: %+v", d)
	}
}

// TestOneBadDocumentIsRejectedAlone: the valid STRICT policy next to a bad
// document applies, and start-up does not fail without --strict-config.
func TestOneBadDocumentIsRejectedAlone(t *testing.T) {
	wl := Workload{Namespace: "shop", Labels: map[string]string{"app": "web"}}
	strict := "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n"
	bad := authzDoc("bad", "shop", "", "  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [not-an-ip]\n")
	st, err := loadYAML(t, wl, docs(strict, bad), WithStrictConfig(false))
	if err != nil {
		t.Fatalf("start-up failed on one rejected document: %v", err)
	}
	snap := st.Current()
	if snap.InboundMode(80) != ModeStrict {
		t.Errorf("the valid STRICT policy was not applied: %v", snap.InboundMode(80))
	}
	// The rejected DENY fails closed: it denies everything it selects.
	if d := snap.Authorize(Request{Peer: id(t, "spiffe://cluster.local/ns/shop/sa/a"), Port: 80}); d.Allowed || d.Policy != "shop/bad" {
		t.Errorf("rejected DENY did not fail closed: %+v", d)
	}
	b, err := snap.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"result":"rejected"`, `"field":"spec.rules[0].from[0].source.ipBlocks[0]"`, `"name":"bad"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("GET /config does not list the rejection (%s): %s", want, b)
		}
	}
	if got := testutil.ToFloat64(metrics.ConfigDocuments.WithLabelValues("AuthorizationPolicy", "rejected")); got != 1 {
		t.Errorf("config_documents{AuthorizationPolicy,rejected} = %v", got)
	}
	if got := testutil.ToFloat64(metrics.ConfigDocuments.WithLabelValues("PeerAuthentication", "applied")); got != 1 {
		t.Errorf("config_documents{PeerAuthentication,applied} = %v", got)
	}
	// --strict-config: the old behaviour, start-up fails.
	if _, err := loadYAML(t, wl, docs(strict, bad)); err == nil || !strings.Contains(err.Error(), "ipBlocks[0]") {
		t.Errorf("strict load: %v", err)
	}
}

func TestRejectedDocumentsFailClosed(t *testing.T) {
	wl := Workload{Namespace: "shop", Labels: map[string]string{"app": "web"}}
	peer := "spiffe://cluster.local/ns/shop/sa/a"
	tests := []struct {
		name    string
		yaml    string
		port    uint16
		allowed bool
		mode    Mode
	}{
		{"rejected ALLOW allows nothing",
			authzDoc("a", "shop", "", "  selector:\n    matchLabels:\n      app: web\n  rules:\n  - from:\n    - source:\n        ipBlocks: [bad]\n"), 80, false, ModePermissive},
		{"rejected ALLOW of another workload changes nothing",
			authzDoc("a", "shop", "", "  selector:\n    matchLabels:\n      app: db\n  rules:\n  - from:\n    - source:\n        ipBlocks: [bad]\n"), 80, true, ModePermissive},
		{"rejected dry-run DENY changes nothing",
			authzDoc("a", "shop", dryRunTrue, "  action: DENY\n  rules:\n  - when:\n    - key: nope\n      values: [x]\n"), 80, true, ModePermissive},
		{"CUSTOM denies what its rules cover",
			authzDoc("ext", "shop", "", "  action: CUSTOM\n  provider:\n    name: opa\n  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]\n        paths: [/admin]\n"), 80, false, ModePermissive},
		{"CUSTOM leaves uncovered ports alone",
			authzDoc("ext", "shop", "", "  action: CUSTOM\n  provider:\n    name: opa\n  rules:\n  - to:\n    - operation:\n        ports: [\"80\"]\n"), 81, true, ModePermissive},
		{"rejected STRICT PeerAuthentication keeps STRICT",
			"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    80:\n      mode: DISABLE\n", 80, true, ModeStrict},
		{"rejected PeerAuthentication with an unreadable mode is STRICT",
			"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: shop\nspec:\n  mtls:\n    mode: MUTUAL\n", 80, true, ModeStrict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Load([]File{{Name: "p.yaml", Data: []byte(tt.yaml)}}, wl, quiet)
			if !cfg.Rejected() {
				t.Fatalf("not rejected: %+v", cfg.Documents)
			}
			snap := NewSnapshot(cfg, wl, quiet)
			if d := snap.Authorize(Request{Peer: id(t, peer), Port: tt.port}); d.Allowed != tt.allowed {
				t.Errorf("Authorize = %+v, want allowed=%v", d, tt.allowed)
			}
			if got := snap.InboundMode(tt.port); got != tt.mode {
				t.Errorf("mode = %v, want %v", got, tt.mode)
			}
		})
	}
}

// TestDefaultNamesClashOnlyWhenTheyCollide: namespace-less documents take
// the workload's namespace; the same name twice is a clash only when the
// specs differ, and then both are rejected, not the directory.
func TestDefaultNamesClashOnlyWhenTheyCollide(t *testing.T) {
	wl := Workload{Namespace: "shop"}
	pa := func(ns, mode string) string {
		meta := "metadata:\n  name: default\n"
		if ns != "" {
			meta += "  namespace: " + ns + "\n"
		}
		return "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n" + meta + "spec:\n  mtls:\n    mode: " + mode + "\n"
	}
	authz := authzDoc("other", "shop", "", "  rules:\n  - from:\n    - source:\n        namespaces: [shop]\n")
	load := func(a, b string) *Config {
		return Load([]File{{Name: "a.yaml", Data: []byte(a)}, {Name: "b.yaml", Data: []byte(docs(b, authz))}}, wl, quiet)
	}
	// Same spec twice: applied once, a warning.
	cfg := load(pa("", "STRICT"), pa("", "STRICT"))
	if cfg.Rejected() || cfg.Documents[1].Result != ResultWarned {
		t.Fatalf("identical defaults: %+v", cfg.Documents)
	}
	// Different namespaces: no clash.
	cfg = load(pa("", "STRICT"), pa("istio-system", "PERMISSIVE"))
	if cfg.Rejected() {
		t.Fatalf("defaults of different namespaces clash: %v", cfg.Err())
	}
	// Really colliding: both rejected, the other document applies, STRICT kept.
	cfg = load(pa("", "STRICT"), pa("shop", "PERMISSIVE"))
	if cfg.Documents[0].Result != ResultRejected || cfg.Documents[1].Result != ResultRejected || cfg.Documents[2].Result != ResultApplied {
		t.Fatalf("collision: %+v", cfg.Documents)
	}
	if !strings.Contains(cfg.Err().Error(), "b.yaml: document 1") {
		t.Errorf("the reason does not name the other document: %v", cfg.Err())
	}
	snap := NewSnapshot(cfg, wl, quiet)
	if snap.InboundMode(80) != ModeStrict {
		t.Errorf("mode = %v, want STRICT kept by the rejected STRICT document", snap.InboundMode(80))
	}
	if d := snap.Authorize(Request{Peer: id(t, "spiffe://cluster.local/ns/shop/sa/x"), Port: 80}); !d.Allowed {
		t.Errorf("the other document was not applied: %+v", d)
	}
}
