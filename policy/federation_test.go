package policy

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// A peer from a federated trust domain gets in only through an ALLOW rule
// that names its trust domain in a principal.
func TestFederatedPeerNeedsAPolicyNamingItsTrustDomain(t *testing.T) {
	const (
		local    = "spiffe://cluster.local/ns/shop/sa/frontend"
		partner  = "spiffe://partner.example/ns/shop/sa/frontend"
		stranger = "spiffe://other.example/ns/shop/sa/frontend"
	)
	mesh := spiffeid.RequireTrustDomainFromString("cluster.local")
	wl := Workload{Namespace: "shop"}
	policy := func(name, action, from string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name +
			"\n  namespace: shop\nspec:\n  action: " + action + "\n  rules:\n  - from:\n    - source:\n" + from
	}
	type check struct {
		peer    string
		allowed bool
		reason  string
	}
	tests := []struct {
		name   string
		yaml   string
		checks []check
	}{
		{"no policy: local peers in, foreign refused", "",
			[]check{{local, true, ReasonAllowed}, {partner, false, ReasonForeignTrustDomain}, {"", true, ReasonAllowed}}},
		{"exact foreign principal", policy("p", "ALLOW", "        principals: [partner.example/ns/shop/sa/frontend]\n"),
			[]check{{partner, true, ReasonAllowed}, {stranger, false, ReasonForeignTrustDomain}, {local, false, ReasonNoAllowMatch}}},
		{"whole foreign trust domain", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			[]check{{partner, true, ReasonAllowed}, {stranger, false, ReasonForeignTrustDomain}}},
		{"foreign namespace pattern", policy("p", "ALLOW", "        principals: [\"partner.example/ns/shop/*\"]\n"),
			[]check{{partner, true, ReasonAllowed}, {"spiffe://partner.example/ns/ops/sa/x", false, ReasonForeignTrustDomain}}},
		{"spiffe:// form names it too", policy("p", "ALLOW", "        principals: [\"spiffe://partner.example/ns/shop/sa/frontend\"]\n"),
			[]check{{partner, true, ReasonAllowed}}},
		{"star does not name a trust domain", policy("p", "ALLOW", "        principals: [\"*\"]\n"),
			[]check{{local, true, ReasonAllowed}, {partner, false, ReasonForeignTrustDomain}}},
		{"suffix pattern does not name a trust domain", policy("p", "ALLOW", "        principals: [\"*/ns/shop/sa/frontend\"]\n"),
			[]check{{local, true, ReasonAllowed}, {partner, false, ReasonForeignTrustDomain}}},
		{"namespace alone does not name a trust domain", policy("p", "ALLOW", "        namespaces: [shop]\n"),
			[]check{{local, true, ReasonAllowed}, {partner, false, ReasonForeignTrustDomain}}},
		{"prefix without the slash does not name it", policy("p", "ALLOW", "        principals: [\"partner*\"]\n"),
			[]check{{partner, false, ReasonForeignTrustDomain}}},
		{"naming with an excluding namespace", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n        notNamespaces: [shop]\n"),
			[]check{{partner, false, ReasonForeignTrustDomain}, {"spiffe://partner.example/ns/ops/sa/x", true, ReasonAllowed}}},
		{"DENY applies to foreign peers first", docs(
			policy("allow", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			policy("deny", "DENY", "        principals: [\"*/sa/frontend\"]\n")),
			[]check{{partner, false, ReasonDeniedByPolicy}, {"spiffe://partner.example/ns/shop/sa/api", true, ReasonAllowed}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var snap *Snapshot
			if tc.yaml == "" {
				snap = Static(wl, quiet).Current()
			} else {
				snap = mustLoad(t, wl, tc.yaml)
			}
			for _, c := range tc.checks {
				d := snap.Authorize(Request{Peer: id(t, c.peer), Port: 8080, TrustDomain: mesh})
				if d.Allowed != c.allowed || d.Reason != c.reason {
					t.Errorf("%q: allowed=%v reason=%s, want %v %s", c.peer, d.Allowed, d.Reason, c.allowed, c.reason)
				}
			}
		})
	}
}

// Without the workload's trust domain the check is off, as before federation.
func TestAuthorizeWithoutTrustDomainSkipsTheForeignCheck(t *testing.T) {
	d := Static(Workload{Namespace: "shop"}, quiet).Current().Authorize(Request{Peer: id(t, "spiffe://partner.example/ns/a/sa/b"), Port: 80})
	if !d.Allowed {
		t.Fatalf("got %+v", d)
	}
}
