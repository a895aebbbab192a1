package policy

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestIstioValidationRules: the rules of Istio's validation added for the
// gaps the corpus did not exercise, each with a document Istio refuses
// (rejected here, naming the field) and, where the line is fine, the
// nearest form it accepts (loaded).
func TestIstioValidationRules(t *testing.T) {
	const ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ap\n  namespace: shop\nspec:\n"
	const dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: dr\n  namespace: shop\nspec:\n  host: db.shop.svc.cluster.local\n"
	rejected := []struct {
		name, yaml, want string
	}{
		{"path with braces outside a template", ap + "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{id}\"]\n", "spec.rules[0].to[0].operation.paths[0]"},
		{"{**} not last", ap + "  rules:\n  - to:\n    - operation:\n        notPaths: [\"/{**}/a/{*}\"]\n", "spec.rules[0].to[0].operation.notPaths[0]"},
		{"templated path with a bad literal", ap + "  rules:\n  - to:\n    - operation:\n        paths: [\"/{*}/a b\"]\n", "spec.rules[0].to[0].operation.paths[0]"},
		{"targetRef and targetRefs", ap + "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]\n", "spec.targetRefs"},
		{"targetRef of a kind a policy cannot attach to", ap + "  targetRefs: [{kind: Deployment, group: apps, name: web}]\n", "spec.targetRefs[0].kind"},
		{"targetRef across namespaces", ap + "  targetRef: {kind: Service, group: \"\", name: web, namespace: other}\n", "spec.targetRef.namespace"},
		{"targetRef without a name", ap + "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io}]\n", "spec.targetRefs[0].name"},
		{"exportTo ~", dr + "  exportTo: [\"~\"]\n", "spec.exportTo[0]"},
		{"exportTo duplicate", dr + "  exportTo: [\".\", shop]\n", "spec.exportTo[1]"},
		{"exportTo * with others", dr + "  exportTo: [\"*\", other]\n", "spec.exportTo"},
		{"workloadSelector exported beyond its namespace", dr + "  workloadSelector: {matchLabels: {app: web}}\n  exportTo: [other]\n", "spec.exportTo"},
		{"duplicate subset names", dr + "  subsets: [{name: v1}, {name: v1}]\n", "spec.subsets[1].name"},
		{"subset name not a DNS label", dr + "  subsets: [{name: V_1}]\n", "spec.subsets[0].name"},
		{"maxEjectionPercent over 100", dr + "  trafficPolicy:\n    outlierDetection: {maxEjectionPercent: 200}\n", "spec.trafficPolicy.outlierDetection.maxEjectionPercent"},
		{"port-level bad interval", dr + "  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n      outlierDetection: {interval: 0s}\n", "portLevelSettings[0].outlierDetection.interval"},
		{"empty connection pool", dr + "  trafficPolicy:\n    connectionPool: {}\n", "spec.trafficPolicy.connectionPool"},
		{"negative HTTP pool setting", dr + "  trafficPolicy:\n    connectionPool: {http: {http1MaxPendingRequests: -1}}\n", "connectionPool.http.http1MaxPendingRequests"},
		{"local origin failures without the split", dr + "  trafficPolicy:\n    outlierDetection: {consecutiveLocalOriginFailures: 3}\n", "outlierDetection.consecutiveLocalOriginFailures"},
	}
	for _, tt := range rejected {
		t.Run(tt.name, func(t *testing.T) {
			_, err := loadYAML(t, Workload{Namespace: "shop"}, tt.yaml)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want one naming %s", err, tt.want)
			}
		})
	}
	accepted := []struct{ name, yaml string }{
		{"path templates", ap + "  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{*}/b/{**}\", \"/x/*\"]\n"},
		{"targetRefs to a Gateway and a Service", ap + "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}, {kind: Service, group: \"\", name: web}]\n"},
		{"exportTo . and another namespace", dr + "  exportTo: [\".\", other]\n"},
		{"workloadSelector exported to its namespace", dr + "  workloadSelector: {matchLabels: {app: web}}\n  exportTo: [\".\"]\n"},
		{"HTTP pool settings", dr + "  trafficPolicy:\n    connectionPool: {http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1, idleTimeout: 30s}}\n"},
		{"outlier detection within range", dr + "  trafficPolicy:\n    outlierDetection: {maxEjectionPercent: 100, interval: 1s, baseEjectionTime: 3m, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}\n"},
	}
	for _, tt := range accepted {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := loadYAML(t, Workload{Namespace: "shop"}, tt.yaml); err != nil {
				t.Fatalf("refused a document Istio accepts: %v", err)
			}
		})
	}
}

// TestEmptyRulesSemantics: as Istio, an ALLOW policy without rules allows
// nothing to the workloads it selects, one with an empty rule allows
// everything, and a DENY policy needs rules.
func TestEmptyRulesSemantics(t *testing.T) {
	const ap = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: ap\n  namespace: shop\nspec:\n"
	wl := Workload{Namespace: "shop"}
	r := Request{Peer: id(t, "spiffe://cluster.local/ns/shop/sa/a"), Port: 80, TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")}
	if d := mustLoad(t, wl, ap+"  {}\n").Authorize(r); d.Allowed {
		t.Errorf("allow-nothing (spec: {}) allowed: %+v", d)
	}
	if d := mustLoad(t, wl, ap+"  rules:\n  - {}\n").Authorize(r); !d.Allowed {
		t.Errorf("allow-all (rules: [{}]) denied: %+v", d)
	}
	if _, err := loadYAML(t, wl, ap+"  action: DENY\n  rules: []\n"); err == nil {
		t.Error("DENY with rules: [] loaded; Istio refuses it (it would never match)")
	}
}
