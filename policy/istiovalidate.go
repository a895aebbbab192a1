package policy

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Rules of Istio's own validation (pkg/config/validation) that the
// compilers of each kind share or that need their own place.

// targetRefSpec is an Istio PolicyTargetReference.
type targetRefSpec struct {
	Group     string `json:"group"`
	Kind      string `json:"kind"`
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
}

// allowedTargetRefs are the kinds a policy may attach to, by group ("" is
// the core group), as Istio allows them.
var allowedTargetRefs = map[string]string{
	"Service":      "",
	"ServiceEntry": "networking.istio.io",
	"Gateway":      "gateway.networking.k8s.io",
	"GatewayClass": "gateway.networking.k8s.io",
}

// checkTargetRefs applies Istio's rules to targetRef and targetRefs: a
// name, no namespace (no cross-namespace reference), and a kind a policy
// can attach to.
func checkTargetRefs(ref json.RawMessage, refs []json.RawMessage) error {
	check := func(path string, raw json.RawMessage) error {
		var r targetRefSpec
		if err := json.Unmarshal(raw, &r); err != nil {
			return fieldErrorf(path, "want a policy target reference: %v", err)
		}
		switch group, ok := allowedTargetRefs[r.Kind]; {
		case r.Name == "":
			return fieldErrorf(path+".name", "required")
		case r.Namespace != "":
			return fieldErrorf(path+".namespace", "must not be set: cross-namespace references are not supported")
		case !ok || (r.Group != group && !(group == "" && r.Group == "core")):
			return fieldErrorf(path+".kind", "%s/%s: a policy attaches to a Service, ServiceEntry, Gateway (gateway.networking.k8s.io) or GatewayClass", r.Group, r.Kind)
		}
		return nil
	}
	if len(ref) > 0 && string(ref) != "null" {
		if err := check("spec.targetRef", ref); err != nil {
			return err
		}
	}
	for i, r := range refs {
		if err := check(fmt.Sprintf("spec.targetRefs[%d]", i), r); err != nil {
			return err
		}
	}
	return nil
}

// Envoy's path template operators, and the characters a literal segment
// of a templated path may hold (RFC 3986 pchar).
const (
	matchOneTemplate = "{*}"
	matchAnyTemplate = "{**}"
)

var pathLiteral = regexp.MustCompile(`^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$`)

// checkPathTemplate applies Istio's rules to a path of an operation: "{*}"
// and "{**}" are whole segments, "{**}" only last, no other braces, and
// the other segments of a templated path are plain literals.
func checkPathTemplate(path, p string) error {
	templated := strings.Contains(p, matchOneTemplate) || strings.Contains(p, matchAnyTemplate)
	anySeen := false
	for _, seg := range strings.Split(strings.Trim(p, "/"), "/") {
		switch {
		case (seg == matchOneTemplate || seg == matchAnyTemplate) && anySeen:
			return fieldErrorf(path, "%q: {**} must be the last operator", p)
		case seg == matchOneTemplate:
			continue
		case seg == matchAnyTemplate:
			anySeen = true
			continue
		case strings.ContainsAny(seg, "{}"):
			return fieldErrorf(path, "%q: '{' or '}' outside a path template operator ({*} or {**})", p)
		case templated && !pathLiteral.MatchString(seg):
			return fieldErrorf(path, "%q: segment %q is not a valid literal", p, seg)
		}
	}
	return nil
}

// checkExportTo applies Istio's rules to a DestinationRule's exportTo: ".",
// "*" or namespaces, each once ("." is the rule's own namespace), "*"
// alone, and a rule with a workloadSelector exported to its namespace only.
func checkExportTo(ns string, exportTo []string, selector bool) error {
	seen := map[string]bool{}
	for i, e := range exportTo {
		path := fmt.Sprintf("spec.exportTo[%d]", i)
		key := e
		if e == "." {
			key = ns
		}
		switch {
		case e == "~":
			return fieldErrorf(path, "exportTo ~ (none) is not allowed for a DestinationRule")
		case e != "*" && e != "." && len(validation.IsDNS1123Label(e)) > 0:
			return fieldErrorf(path, "%q: want \"*\", \".\" or a namespace", e)
		case seen[key]:
			return fieldErrorf(path, "%q: duplicate entry (\".\" is namespace %s)", e, ns)
		}
		seen[key] = true
	}
	if seen["*"] && len(exportTo) > 1 {
		return fieldErrorf("spec.exportTo", "\"*\" cannot be listed with other entries")
	}
	if selector && len(exportTo) > 0 && (!seen[ns] || len(exportTo) > 1) {
		return fieldErrorf("spec.exportTo", "a DestinationRule with a workloadSelector cannot be exported beyond its namespace")
	}
	return nil
}

// checkSubsets applies Istio's rules to subset names: a DNS label, each
// once.
func checkSubsets(subsets []destRuleSubset) error {
	seen := map[string]bool{}
	for i, s := range subsets {
		path := fmt.Sprintf("spec.subsets[%d].name", i)
		switch {
		case s.Name == "":
			return fieldErrorf(path, "required")
		case len(validation.IsDNS1123Label(s.Name)) > 0:
			return fieldErrorf(path, "%q: want a DNS label", s.Name)
		case seen[s.Name]:
			return fieldErrorf(path, "%q: duplicate subset name", s.Name)
		}
		seen[s.Name] = true
	}
	return nil
}

// checkOutlierDetection applies Istio's rules to outlierDetection, which
// meshproxy otherwise ignores: percentages within 0-100, durations of at
// least 1ms, and consecutiveLocalOriginFailures only with
// splitExternalLocalOriginErrors.
func checkOutlierDetection(path string, raw json.RawMessage) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var od struct {
		MaxEjectionPercent             *int64  `json:"maxEjectionPercent"`
		MinHealthPercent               *int64  `json:"minHealthPercent"`
		BaseEjectionTime               *string `json:"baseEjectionTime"`
		Interval                       *string `json:"interval"`
		SplitExternalLocalOriginErrors bool    `json:"splitExternalLocalOriginErrors"`
		ConsecutiveLocalOriginFailures *int64  `json:"consecutiveLocalOriginFailures"`
	}
	if err := json.Unmarshal(raw, &od); err != nil {
		return fieldErrorf(path, "%v", err)
	}
	for name, p := range map[string]*int64{"maxEjectionPercent": od.MaxEjectionPercent, "minHealthPercent": od.MinHealthPercent} {
		if p != nil && (*p < 0 || *p > 100) {
			return fieldErrorf(path+"."+name, "%d: want 0-100", *p)
		}
	}
	for name, d := range map[string]*string{"baseEjectionTime": od.BaseEjectionTime, "interval": od.Interval} {
		if err := checkDuration(path+"."+name, d); err != nil {
			return err
		}
	}
	if !od.SplitExternalLocalOriginErrors && od.ConsecutiveLocalOriginFailures != nil && *od.ConsecutiveLocalOriginFailures > 0 {
		return fieldErrorf(path+".consecutiveLocalOriginFailures", "needs splitExternalLocalOriginErrors: true")
	}
	return nil
}

// checkConnectionPool applies Istio's rules to a connectionPool beyond its
// tcp part (compilePool): at least one of tcp or http, and the HTTP
// settings meshproxy ignores still non-negative, with valid durations.
func checkConnectionPool(path string, pool *connectionPool) error {
	if pool == nil {
		return nil
	}
	if isUnset(pool.TCP) && isUnset(pool.HTTP) {
		return fieldErrorf(path, "set at least one of tcp or http")
	}
	if isUnset(pool.HTTP) {
		return nil
	}
	var h struct {
		HTTP1MaxPendingRequests  *int64  `json:"http1MaxPendingRequests"`
		HTTP2MaxRequests         *int64  `json:"http2MaxRequests"`
		MaxRequestsPerConnection *int64  `json:"maxRequestsPerConnection"`
		MaxRetries               *int64  `json:"maxRetries"`
		MaxConcurrentStreams     *int64  `json:"maxConcurrentStreams"`
		IdleTimeout              *string `json:"idleTimeout"`
		H2UpgradePolicy          string  `json:"h2UpgradePolicy"`
		UseClientProtocol        bool    `json:"useClientProtocol"`
	}
	if err := json.Unmarshal(pool.HTTP, &h); err != nil {
		return fieldErrorf(path+".http", "%v", err)
	}
	for name, v := range map[string]*int64{"http1MaxPendingRequests": h.HTTP1MaxPendingRequests, "http2MaxRequests": h.HTTP2MaxRequests,
		"maxRequestsPerConnection": h.MaxRequestsPerConnection, "maxRetries": h.MaxRetries, "maxConcurrentStreams": h.MaxConcurrentStreams} {
		if v != nil && *v < 0 {
			return fieldErrorf(path+".http."+name, "%d: must not be negative", *v)
		}
	}
	if err := checkDuration(path+".http.idleTimeout", h.IdleTimeout); err != nil {
		return err
	}
	if h.H2UpgradePolicy == "UPGRADE" && h.UseClientProtocol {
		return fieldErrorf(path+".http.useClientProtocol", "must not be true with h2UpgradePolicy UPGRADE")
	}
	return nil
}

// checkDuration applies Istio's rule for a duration: at least 1ms. nil is
// unset.
func checkDuration(path string, d *string) error {
	if d == nil {
		return nil
	}
	if v, err := time.ParseDuration(*d); err != nil || v < time.Millisecond {
		return fieldErrorf(path, "%q: want a duration of at least 1ms", *d)
	}
	return nil
}
