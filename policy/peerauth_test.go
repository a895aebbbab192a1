package policy

import (
	"fmt"
	"testing"
)

func peerAuth(ns, name, created, selector, mode string, ports map[int]string) string {
	s := fmt.Sprintf("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: %s\n  namespace: %s\n", name, ns)
	if created != "" {
		s += fmt.Sprintf("  creationTimestamp: %q\n", created)
	}
	s += "spec:\n"
	if selector != "" {
		s += "  selector:\n    matchLabels:\n      app: " + selector + "\n"
	}
	if mode != "" {
		s += "  mtls:\n    mode: " + mode + "\n"
	}
	if len(ports) > 0 {
		s += "  portLevelMtls:\n"
		for p, m := range ports {
			s += fmt.Sprintf("    %d:\n      mode: %s\n", p, m)
		}
	}
	return s
}

func TestInboundModePrecedence(t *testing.T) {
	web := Workload{Namespace: "shop", Labels: map[string]string{"app": "web", "version": "v1"}}
	tests := []struct {
		name     string
		yaml     string
		wl       Workload
		opts     []Option
		port     uint16
		want     Mode
		wantPort map[uint16]Mode // more ports to check
	}{
		{name: "no policy is PERMISSIVE", want: ModePermissive},
		{name: "no policy uses WithDefaultMode", opts: []Option{WithDefaultMode(ModeStrict)}, want: ModeStrict},
		{name: "mesh policy applies",
			yaml: peerAuth("istio-system", "default", "", "", "STRICT", nil), want: ModeStrict},
		{name: "mesh policy in a custom root namespace",
			yaml: peerAuth("mesh-root", "default", "", "", "STRICT", nil),
			opts: []Option{WithRootNamespace("mesh-root")}, want: ModeStrict},
		{name: "istio-system is not the root when another is set",
			yaml: peerAuth("istio-system", "default", "", "", "STRICT", nil),
			opts: []Option{WithRootNamespace("mesh-root")}, want: ModePermissive},
		{name: "namespace overrides mesh",
			yaml: docs(peerAuth("istio-system", "default", "", "", "STRICT", nil), peerAuth("shop", "default", "", "", "DISABLE", nil)),
			want: ModeDisable},
		{name: "workload overrides namespace",
			yaml: docs(peerAuth("shop", "default", "", "", "DISABLE", nil), peerAuth("shop", "web", "", "web", "STRICT", nil)),
			want: ModeStrict},
		{name: "port level overrides workload on its port only",
			yaml: docs(peerAuth("shop", "web", "", "web", "STRICT", map[int]string{9090: "DISABLE"})),
			port: 9090, want: ModeDisable, wantPort: map[uint16]Mode{8080: ModeStrict}},
		{name: "UNSET namespace inherits mesh",
			yaml: docs(peerAuth("istio-system", "default", "", "", "STRICT", nil), peerAuth("shop", "default", "", "", "UNSET", nil)),
			want: ModeStrict},
		{name: "missing mtls inherits mesh",
			yaml: docs(peerAuth("istio-system", "default", "", "", "DISABLE", nil), peerAuth("shop", "default", "", "", "", nil)),
			want: ModeDisable},
		{name: "UNSET workload inherits namespace",
			yaml: docs(peerAuth("shop", "default", "", "", "STRICT", nil), peerAuth("shop", "web", "", "web", "UNSET", nil)),
			want: ModeStrict},
		{name: "UNSET everywhere inherits the default",
			yaml: docs(peerAuth("istio-system", "default", "", "", "UNSET", nil), peerAuth("shop", "web", "", "web", "UNSET", nil)),
			opts: []Option{WithDefaultMode(ModeDisable)}, want: ModeDisable},
		{name: "UNSET port inherits the resolved workload mode",
			yaml: docs(peerAuth("istio-system", "default", "", "", "STRICT", nil), peerAuth("shop", "web", "", "web", "UNSET", map[int]string{8080: "UNSET", 9090: "PERMISSIVE"})),
			port: 8080, want: ModeStrict, wantPort: map[uint16]Mode{9090: ModePermissive, 1: ModeStrict}},
		{name: "selector mismatch does not apply",
			yaml: docs(peerAuth("shop", "default", "", "", "STRICT", nil), peerAuth("shop", "api", "", "api", "DISABLE", nil)),
			want: ModeStrict},
		{name: "workload without labels is not selected",
			wl:   Workload{Namespace: "shop"},
			yaml: docs(peerAuth("shop", "web", "", "web", "DISABLE", nil)),
			want: ModePermissive},
		{name: "other namespace is ignored",
			yaml: docs(peerAuth("billing", "default", "", "", "DISABLE", nil), peerAuth("billing", "web", "", "web", "DISABLE", nil)),
			opts: []Option{WithDefaultMode(ModeStrict)}, want: ModeStrict},
		{name: "selector policy in the root namespace does not apply (as in Istio)",
			yaml: docs(peerAuth("istio-system", "web", "", "web", "DISABLE", nil)),
			want: ModePermissive},
		{name: "oldest namespace policy wins a tie",
			yaml: docs(peerAuth("shop", "a-new", "2025-02-01T00:00:00Z", "", "DISABLE", nil), peerAuth("shop", "z-old", "2025-01-01T00:00:00Z", "", "STRICT", nil)),
			want: ModeStrict},
		{name: "name breaks a timestamp tie",
			yaml: docs(peerAuth("shop", "b", "", "web", "DISABLE", nil), peerAuth("shop", "a", "", "web", "STRICT", nil)),
			want: ModeStrict},
		{name: "policy without namespace is in the workload's namespace",
			yaml: "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\nspec:\n  mtls:\n    mode: STRICT\n",
			want: ModeStrict},
		{name: "workload in the root namespace sees its mesh policy",
			wl:   Workload{Namespace: "istio-system"},
			yaml: peerAuth("istio-system", "default", "", "", "DISABLE", nil), want: ModeDisable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wl := tt.wl
			if wl.Namespace == "" {
				wl = web
			}
			snap := mustLoad(t, wl, tt.yaml, tt.opts...)
			port := tt.port
			if port == 0 {
				port = 8080
			}
			if got := snap.InboundMode(port); got != tt.want {
				t.Errorf("InboundMode(%d) = %v, want %v", port, got, tt.want)
			}
			for p, want := range tt.wantPort {
				if got := snap.InboundMode(p); got != want {
					t.Errorf("InboundMode(%d) = %v, want %v", p, got, want)
				}
			}
		})
	}
}

func TestParseModeRoundTrips(t *testing.T) {
	for _, m := range []Mode{ModeUnset, ModeDisable, ModePermissive, ModeStrict} {
		got, err := ParseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	if got, err := ParseMode("strict"); err != nil || got != ModeStrict {
		t.Errorf("ParseMode(strict) = %v, %v", got, err)
	}
	if _, err := ParseMode("MUTUAL"); err == nil {
		t.Error("ParseMode(MUTUAL) succeeded")
	}
}

func TestStaticUsesDefaults(t *testing.T) {
	st := Static(Workload{Namespace: "a"}, WithDefaultMode(ModeStrict), quiet)
	snap := st.Current()
	if snap.InboundMode(80) != ModeStrict {
		t.Errorf("mode = %v", snap.InboundMode(80))
	}
	if d := snap.Authorize(Request{Port: 80}); !d.Allowed || d.Reason != ReasonAllowed {
		t.Errorf("Authorize = %+v", d)
	}
	if o := snap.Outbound(mustAddrPort("10.0.0.1:80")); o.Matched {
		t.Errorf("Outbound = %+v", o)
	}
	if snap.Generation() != 1 {
		t.Errorf("generation = %d", snap.Generation())
	}
}
