package policy

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Istio matches namespaces against the whole principal (".*/ns/NS/.*"), so
// an identity whose path carries /ns/NS/ anywhere, as a federated trust
// domain or a SPIFFE agent may issue, is "in" NS for every rule that
// refuses: a DENY on namespaces and an ALLOW's notNamespaces. An ID cannot
// escape those by a path of another shape.
func TestNamespaceExclusionsCoverEveryNsSegmentOfTheID(t *testing.T) {
	const (
		oddTail   = "spiffe://partner.example/ns/shop/sa/frontend/extra"
		oddHead   = "spiffe://partner.example/region/eu/ns/shop/sa/frontend"
		localTail = "spiffe://cluster.local/ns/ops/sa/admin/v2"
		fine      = "spiffe://partner.example/ns/ops/sa/x"
	)
	mesh := spiffeid.RequireTrustDomainFromString("cluster.local")
	wl := Workload{Namespace: "shop"}
	policy := func(name, action, from string) string {
		return "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: " + name +
			"\n  namespace: shop\nspec:\n  action: " + action + "\n  rules:\n  - from:\n    - source:\n" + from
	}
	tests := []struct {
		name    string
		yaml    string
		peer    string
		allowed bool
		reason  string
	}{
		{"ALLOW notNamespaces excludes an ID with the namespace after its sa", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n        notNamespaces: [shop]\n"),
			oddTail, false, ReasonForeignTrustDomain},
		{"ALLOW notNamespaces excludes an ID with the namespace deeper in its path", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n        notNamespaces: [shop]\n"),
			oddHead, false, ReasonForeignTrustDomain},
		{"ALLOW notNamespaces prefix pattern", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n        notNamespaces: [\"sh*\"]\n"),
			oddHead, false, ReasonForeignTrustDomain},
		{"ALLOW notNamespaces still admits other namespaces", policy("p", "ALLOW", "        principals: [\"partner.example/*\"]\n        notNamespaces: [shop]\n"),
			fine, true, ReasonAllowed},
		{"DENY namespaces catches an ID with the namespace after its sa", docs(
			policy("allow", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			policy("deny", "DENY", "        namespaces: [shop]\n")),
			oddTail, false, ReasonDeniedByPolicy},
		{"DENY namespaces catches an ID with the namespace deeper in its path", docs(
			policy("allow", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			policy("deny", "DENY", "        namespaces: [shop]\n")),
			oddHead, false, ReasonDeniedByPolicy},
		{"DENY namespaces suffix pattern", docs(
			policy("allow", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			policy("deny", "DENY", "        namespaces: [\"*op\"]\n")),
			oddHead, false, ReasonDeniedByPolicy},
		{"DENY namespaces in the own trust domain", policy("deny", "DENY", "        namespaces: [ops]\n"),
			localTail, false, ReasonDeniedByPolicy},
		{"DENY namespaces leaves other namespaces alone", docs(
			policy("allow", "ALLOW", "        principals: [\"partner.example/*\"]\n"),
			policy("deny", "DENY", "        namespaces: [shop]\n")),
			fine, true, ReasonAllowed},
		// The positive ALLOW match stays strict: only /ns/NS/sa/SA grants NS.
		{"ALLOW namespaces needs the ns/sa form", policy("p", "ALLOW", "        namespaces: [ops]\n"),
			localTail, false, ReasonNoAllowMatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			snap := mustLoad(t, wl, tc.yaml)
			d := snap.Authorize(Request{Peer: id(t, tc.peer), Port: 8080, TrustDomain: mesh})
			if d.Allowed != tc.allowed || d.Reason != tc.reason {
				t.Errorf("%q: allowed=%v reason=%s (policy %q), want %v %s", tc.peer, d.Allowed, d.Reason, d.Policy, tc.allowed, tc.reason)
			}
		})
	}
}
