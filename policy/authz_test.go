package policy

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestAuthorize(t *testing.T) {
	const (
		frontend = "spiffe://cluster.local/ns/shop/sa/frontend"
		admin    = "spiffe://cluster.local/ns/ops/sa/admin"
		batch    = "spiffe://cluster.local/ns/shop/sa/batch-nightly"
		foreign  = "spiffe://partner.example/ns/shop/sa/frontend"
		odd      = "spiffe://cluster.local/workers/7" // no /ns/NS/sa/SA path
	)
	wl := Workload{Namespace: "shop", Labels: map[string]string{"app": "api"}}
	policy := func(name, body string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name + "\n  namespace: shop\nspec:\n" + body
	}
	type check struct {
		peer    string
		port    uint16
		allowed bool
		reason  string
		policy  string
	}
	allow := func(peer string, port uint16, policy string) check {
		return check{peer, port, true, ReasonAllowed, policy}
	}
	deny := func(peer string, port uint16, reason, policy string) check {
		return check{peer, port, false, reason, policy}
	}
	tests := []struct {
		name   string
		yaml   string
		opts   []Option
		checks []check
	}{
		{name: "no policy allows everyone",
			checks: []check{allow(frontend, 80, ""), allow("", 80, "")}},
		{name: "exact principal",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/frontend]\n"),
			checks: []check{allow(frontend, 80, "shop/p"), deny(admin, 80, ReasonNoAllowMatch, ""), deny("", 80, ReasonNoAllowMatch, "")}},
		{name: "principal in spiffe:// form",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [\"spiffe://cluster.local/ns/shop/sa/frontend\"]\n"),
			checks: []check{allow(frontend, 80, "shop/p"), deny(admin, 80, ReasonNoAllowMatch, "")}},
		{name: "prefix principal",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/batch-*\"]\n"),
			checks: []check{allow(batch, 80, "shop/p"), deny(frontend, 80, ReasonNoAllowMatch, "")}},
		{name: "suffix principal matches any trust domain",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [\"*/ns/shop/sa/frontend\"]\n"),
			checks: []check{allow(frontend, 80, "shop/p"), allow(foreign, 80, "shop/p"), deny(batch, 80, ReasonNoAllowMatch, "")}},
		{name: "star principal is any authenticated peer",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]\n"),
			checks: []check{allow(admin, 80, "shop/p"), allow(odd, 80, "shop/p"), deny("", 80, ReasonNoAllowMatch, "")}},
		{name: "cluster.local stands for the mesh trust domain",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/frontend]\n"),
			opts:   []Option{WithTrustDomain(spiffeid.RequireTrustDomainFromString("prod.example"))},
			checks: []check{allow("spiffe://prod.example/ns/shop/sa/frontend", 80, "shop/p"), deny(frontend, 80, ReasonNoAllowMatch, "")}},
		{name: "namespaces",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        namespaces: [ops, \"team-*\"]\n"),
			checks: []check{allow(admin, 80, "shop/p"), allow("spiffe://cluster.local/ns/team-blue/sa/x", 80, "shop/p"), deny(frontend, 80, ReasonNoAllowMatch, ""), deny(odd, 80, ReasonNoAllowMatch, ""), deny("", 80, ReasonNoAllowMatch, "")}},
		{name: "notPrincipals",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        namespaces: [shop]\n        notPrincipals: [cluster.local/ns/shop/sa/frontend]\n"),
			checks: []check{allow(batch, 80, "shop/p"), deny(frontend, 80, ReasonNoAllowMatch, ""), deny(admin, 80, ReasonNoAllowMatch, "")}},
		{name: "notNamespaces",
			yaml:   policy("p", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [shop]\n"),
			checks: []check{allow(frontend, 80, ""), deny(admin, 80, ReasonDeniedByPolicy, "shop/p"), deny(odd, 80, ReasonDeniedByPolicy, "shop/p")}},
		{name: "ports and notPorts",
			yaml: policy("p", "  rules:\n  - to:\n    - operation:\n        ports: [\"8080\", 9090]\n  - from:\n    - source:\n        principals: [\"*\"]\n    to:\n    - operation:\n        notPorts: [\"15000\"]\n"),
			checks: []check{allow("", 8080, "shop/p"), allow("", 9090, "shop/p"), deny("", 443, ReasonNoAllowMatch, ""),
				allow(admin, 443, "shop/p"), deny(admin, 15000, ReasonNoAllowMatch, "")}},
		{name: "from and to must both match",
			yaml:   policy("p", "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/ops/sa/admin]\n    to:\n    - operation:\n        ports: [\"9090\"]\n"),
			checks: []check{allow(admin, 9090, "shop/p"), deny(admin, 8080, ReasonNoAllowMatch, ""), deny(frontend, 9090, ReasonNoAllowMatch, "")}},
		{name: "any of several sources",
			yaml: policy("p", "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/ops/sa/admin]\n    - source:\n        namespaces: [shop]\n"),
			// The namespace comes from the ID's path, whatever its trust domain (as Istio's /ns/NS/ match).
			checks: []check{allow(admin, 80, "shop/p"), allow(frontend, 80, "shop/p"), allow(foreign, 80, "shop/p"), deny(odd, 80, ReasonNoAllowMatch, "")}},
		{name: "DENY is evaluated before ALLOW",
			yaml: docs(
				policy("allow-all", "  rules:\n  - {}\n"),
				policy("deny-admin", "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/ops/sa/admin]\n")),
			checks: []check{deny(admin, 80, ReasonDeniedByPolicy, "shop/deny-admin"), allow(frontend, 80, "shop/allow-all"), allow("", 80, "shop/allow-all")}},
		{name: "plaintext peer matches notPrincipals star (Istio's require-mTLS policy)",
			yaml:   policy("require-mtls", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n"),
			checks: []check{deny("", 80, ReasonDeniedByPolicy, "shop/require-mtls"), allow(frontend, 80, "")}},
		{name: "plaintext peer matches a rule without source",
			yaml:   policy("p", "  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n"),
			checks: []check{allow("", 8080, "shop/p"), deny("", 8081, ReasonNoAllowMatch, "")}},
		{name: "ALLOW with no rules allows nothing",
			yaml:   policy("allow-nothing", "  action: ALLOW\n"),
			checks: []check{deny(frontend, 80, ReasonNoAllowMatch, ""), deny("", 80, ReasonNoAllowMatch, "")}},
		{name: "empty spec allows nothing",
			yaml:   policy("allow-nothing", "  {}\n"),
			checks: []check{deny(frontend, 80, ReasonNoAllowMatch, "")}},
		{name: "ALLOW with empty rules list allows nothing",
			yaml:   policy("p", "  rules: []\n"),
			checks: []check{deny(frontend, 80, ReasonNoAllowMatch, "")}},
		{name: "ALLOW with one empty rule allows all",
			yaml:   policy("allow-all", "  rules:\n  - {}\n"),
			checks: []check{allow(frontend, 80, "shop/allow-all"), allow("", 80, "shop/allow-all")}},
		{name: "DENY with no rules is rejected as Istio does, and fails closed",
			yaml:   policy("p", "  action: DENY\n"),
			opts:   []Option{WithStrictConfig(false)},
			checks: []check{deny(frontend, 80, ReasonDeniedByPolicy, "shop/p"), deny("", 80, ReasonDeniedByPolicy, "shop/p")}},
		{name: "DENY with one empty rule denies all",
			yaml:   policy("deny-all", "  action: DENY\n  rules:\n  - {}\n"),
			checks: []check{deny(frontend, 80, ReasonDeniedByPolicy, "shop/deny-all"), deny("", 80, ReasonDeniedByPolicy, "shop/deny-all")}},
		{name: "selector mismatch does not apply",
			yaml:   policy("p", "  selector:\n    matchLabels:\n      app: other\n"),
			checks: []check{allow(frontend, 80, "")}},
		{name: "selector match applies",
			yaml:   policy("p", "  selector:\n    matchLabels:\n      app: api\n"),
			checks: []check{deny(frontend, 80, ReasonNoAllowMatch, "")}},
		{name: "other namespace is ignored",
			yaml:   "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: billing\nspec: {}\n",
			checks: []check{allow(frontend, 80, "")}},
		{name: "root namespace applies mesh-wide, with selector too",
			yaml: docs(
				"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-ops\n  namespace: istio-system\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [ops]\n",
				"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-only-shop\n  namespace: istio-system\nspec:\n  selector:\n    matchLabels:\n      app: api\n  rules:\n  - from:\n    - source:\n        namespaces: [shop]\n"),
			checks: []check{deny(admin, 80, ReasonDeniedByPolicy, "istio-system/deny-ops"), allow(frontend, 80, "istio-system/api-only-shop"), deny(odd, 80, ReasonNoAllowMatch, "")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			snap := mustLoad(t, wl, tt.yaml, tt.opts...)
			for _, c := range tt.checks {
				got := snap.Authorize(Request{Peer: id(t, c.peer), Port: c.port})
				want := Decision{Allowed: c.allowed, Reason: c.reason, Policy: c.policy}
				if got.Allowed != want.Allowed || got.Reason != want.Reason || got.Policy != want.Policy {
					t.Errorf("Authorize(%q, %d) = %+v, want %+v", c.peer, c.port, got, want)
				}
			}
		})
	}
}
