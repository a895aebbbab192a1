package policy

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// HTTP-only and L4 attributes, as Istio names them in `when` keys.
const (
	keySourceIP       = "source.ip"
	keyRemoteIP       = "remote.ip"
	keyNamespace      = "source.namespace"
	keyServiceAccount = "source.serviceAccount"
	keyTrustDomain    = "source.trustDomain"
	keyPrincipal      = "source.principal"
	keyDestIP         = "destination.ip"
	keyDestPort       = "destination.port"
	keySNI            = "connection.sni"
)

// authzCompiler compiles one AuthorizationPolicy, collecting warnings.
type authzCompiler struct {
	td     spiffeid.TrustDomain
	ns     string // the policy's namespace: serviceAccounts without one are in it
	action authzAction
	warn   func(field, format string, args ...any)
}

// compileAuthz validates spec as Istio does and compiles what it means for
// TCP traffic. A CUSTOM policy is compiled as DENY and returned with
// errCustom: the caller rejects the document and enforces the result (fail
// closed). Warnings go to warn.
func compileAuthz(m meta, spec *authzSpec, td spiffeid.TrustDomain, warn func(field, format string, args ...any)) (*authzPolicy, error) {
	p := &authzPolicy{meta: m, selector: spec.Selector.labels()}
	if err := validateSelector("spec.selector", spec.Selector, warn); err != nil {
		return nil, err
	}
	targeted := len(spec.TargetRef) > 0 || len(spec.TargetRefs) > 0
	if targeted && spec.Selector != nil {
		return nil, fieldErrorf("spec.targetRefs", "only one of targetRefs or selector can be set")
	}
	if len(spec.TargetRef) > 0 && len(spec.TargetRefs) > 0 {
		return nil, fieldErrorf("spec.targetRefs", "only one of targetRef or targetRefs can be set")
	}
	if err := checkTargetRefs(spec.TargetRef, spec.TargetRefs); err != nil {
		return nil, err
	}
	custom := false
	switch spec.Action {
	case "", "ALLOW":
	case "DENY":
		p.action = actionDeny
		if len(spec.Rules) == 0 {
			return nil, fieldErrorf("spec.rules", "DENY without rules never matches; add an empty rule {} to deny everything")
		}
	case "AUDIT":
		p.action = actionAudit
	case "CUSTOM":
		custom = true
		p.action = actionDeny
		if len(spec.Rules) == 0 {
			return nil, fieldErrorf("spec.rules", "CUSTOM without rules never matches; add an empty rule {} to cover everything")
		}
		if spec.Provider == nil || spec.Provider.Name == "" {
			return nil, fieldErrorf("spec.provider.name", "required with action CUSTOM")
		}
		if err := checkCustomRules(spec.Rules); err != nil {
			return nil, err
		}
	default:
		return nil, fieldErrorf("spec.action", "unknown action %q (want ALLOW, DENY, AUDIT or CUSTOM)", spec.Action)
	}
	if spec.Provider != nil && !custom {
		return nil, fieldErrorf("spec.provider", "only allowed with action CUSTOM, not %s", p.action)
	}
	c := &authzCompiler{td: td, ns: m.namespace, action: p.action, warn: warn}
	for i, r := range spec.Rules {
		path := fmt.Sprintf("spec.rules[%d]", i)
		if r == nil {
			return nil, fieldErrorf(path, "must not be null")
		}
		rule, err := c.rule(path, r)
		if err != nil {
			return nil, err
		}
		p.rules = append(p.rules, rule)
	}
	if targeted {
		warn("spec.targetRefs", "attaches the policy to a gateway or waypoint; it selects no sidecar and is not applied here")
		p.selector = map[string]string{"\x00targetRef": ""} // a label no workload can carry
	}
	if p.action == actionAudit {
		warn("spec.action", "AUDIT only logs requests in Istio; meshproxy applies it as a no-op (it never allows or denies)")
	}
	if custom {
		return p, errCustom
	}
	return p, nil
}

// errCustom marks a CUSTOM policy: valid, but it needs an external
// authorizer meshproxy does not have.
var errCustom = fieldErrorf("spec.action", "CUSTOM needs an external authorization provider, which meshproxy does not have; "+
	"fails closed: the workloads it selects refuse what its rules cover (HTTP-only fields left out)")

// checkCustomRules applies Istio's limits on CUSTOM rules.
func checkCustomRules(rules []*authzRule) error {
	for i, r := range rules {
		if r == nil {
			continue
		}
		for j, f := range r.From {
			if f == nil || f.Source == nil {
				continue
			}
			s := f.Source
			for name, set := range map[string]bool{
				"namespaces": len(s.Namespaces) > 0, "notNamespaces": len(s.NotNamespaces) > 0,
				"serviceAccounts": len(s.ServiceAccounts) > 0, "notServiceAccounts": len(s.NotServiceAccounts) > 0,
				"trustDomains": len(s.TrustDomains) > 0, "notTrustDomains": len(s.NotTrustDomains) > 0,
				"principals": len(s.Principals) > 0, "notPrincipals": len(s.NotPrincipals) > 0,
				"requestPrincipals": len(s.RequestPrincipals) > 0, "notRequestPrincipals": len(s.NotRequestPrincipals) > 0,
			} {
				if set {
					return fieldErrorf(fmt.Sprintf("spec.rules[%d].from[%d].source.%s", i, j, name), "not supported with action CUSTOM")
				}
			}
		}
		for j, w := range r.When {
			if w == nil {
				continue
			}
			switch {
			case w.Key == keyNamespace, w.Key == keyServiceAccount, w.Key == keyTrustDomain, w.Key == keyPrincipal,
				strings.HasPrefix(w.Key, "request.auth."):
				return fieldErrorf(fmt.Sprintf("spec.rules[%d].when[%d].key", i, j), "%s is not supported with action CUSTOM", w.Key)
			}
		}
	}
	return nil
}

// validateSelector applies Istio's rules for a workload selector.
func validateSelector(path string, s *workloadSelector, warn func(field, format string, args ...any)) error {
	if s == nil {
		return nil
	}
	for _, k := range sortedKeys(s.MatchLabels) {
		v := s.MatchLabels[k]
		if k == "" {
			return fieldErrorf(path+".matchLabels", "empty label key")
		}
		if strings.Contains(k, "*") || strings.Contains(v, "*") {
			return fieldErrorf(path+".matchLabels["+k+"]", "wildcards are not supported in selectors")
		}
	}
	if len(s.MatchLabels) == 0 {
		warn(path, "selector without labels selects every workload of the namespace")
	}
	return nil
}

// narrow handles an attribute a TCP connection does not have: an ALLOW
// (or AUDIT) rule needing it never matches; a DENY rule is applied without
// it (Istio's TCP semantics: more restrictive either way).
func (c *authzCompiler) narrow(rule *authzRuleMatch, field, what string) {
	if c.action == actionAudit { // decides nothing either way; the action's warning says so
		rule.never = true
		return
	}
	if c.action == actionDeny {
		c.warn(field, "%s; left out, so this DENY rule matches without it (as Istio does for TCP)", what)
		return
	}
	rule.never = true
	c.warn(field, "%s; this %s rule never matches TCP traffic (as in Istio)", what, c.action)
}

const httpOnly = "HTTP-only attribute, not seen on TCP connections"

func (c *authzCompiler) rule(path string, r *authzRule) (authzRuleMatch, error) {
	var out authzRuleMatch
	if r.From != nil && len(r.From) == 0 {
		return out, fieldErrorf(path+".from", "must not be empty when set")
	}
	if r.To != nil && len(r.To) == 0 {
		return out, fieldErrorf(path+".to", "must not be empty when set")
	}
	for j, f := range r.From {
		fp := fmt.Sprintf("%s.from[%d].source", path, j)
		if f == nil || f.Source == nil {
			return out, fieldErrorf(fp, "required")
		}
		src, err := c.source(fp, f.Source, &out)
		if err != nil {
			return out, err
		}
		out.from = append(out.from, src)
	}
	for j, t := range r.To {
		tp := fmt.Sprintf("%s.to[%d].operation", path, j)
		if t == nil || t.Operation == nil {
			return out, fieldErrorf(tp, "required")
		}
		op, err := c.operation(tp, t.Operation, &out)
		if err != nil {
			return out, err
		}
		out.to = append(out.to, op)
	}
	for j, w := range r.When {
		wp := fmt.Sprintf("%s.when[%d]", path, j)
		if w == nil {
			return out, fieldErrorf(wp, "must not be null")
		}
		cd, ok, err := c.when(wp, w, &out)
		if err != nil {
			return out, err
		}
		if ok {
			out.when = append(out.when, cd)
		}
	}
	return out, nil
}

func (c *authzCompiler) source(path string, s *authzSource, rule *authzRuleMatch) (conds, error) {
	if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) > 0 &&
		len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 {
		return nil, fieldErrorf(path+".serviceAccounts", "cannot be set with namespaces or principals")
	}
	n := 0
	for _, l := range [][]string{s.Principals, s.NotPrincipals, s.RequestPrincipals, s.NotRequestPrincipals, s.Namespaces, s.NotNamespaces,
		s.ServiceAccounts, s.NotServiceAccounts, s.TrustDomains, s.NotTrustDomains, s.IPBlocks, s.NotIPBlocks, s.RemoteIPBlocks, s.NotRemoteIPBlocks} {
		n += len(l)
	}
	if n == 0 {
		return nil, fieldErrorf(path, "must set at least one field")
	}
	var out conds
	for _, f := range []struct {
		name, notName string
		in, notIn     []string
		attr          attr
	}{
		{"principals", "notPrincipals", s.Principals, s.NotPrincipals, attrPrincipal},
		{"namespaces", "notNamespaces", s.Namespaces, s.NotNamespaces, attrNamespace},
		{"trustDomains", "notTrustDomains", s.TrustDomains, s.NotTrustDomains, attrTrustDomain},
		{"serviceAccounts", "notServiceAccounts", s.ServiceAccounts, s.NotServiceAccounts, attrServiceAccount},
		{"ipBlocks", "notIpBlocks", s.IPBlocks, s.NotIPBlocks, attrSourceIP},
		{"remoteIpBlocks", "notRemoteIpBlocks", s.RemoteIPBlocks, s.NotRemoteIPBlocks, attrRemoteIP},
	} {
		cd, ok, err := c.cond(f.attr, path+"."+f.name, f.in, path+"."+f.notName, f.notIn)
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, cd)
		}
	}
	for _, f := range []struct {
		name string
		in   []string
	}{{"requestPrincipals", s.RequestPrincipals}, {"notRequestPrincipals", s.NotRequestPrincipals}} {
		if err := checkNonEmpty(path+"."+f.name, f.in); err != nil {
			return nil, err
		}
		if len(f.in) > 0 {
			c.narrow(rule, path+"."+f.name, "request principals come from JWTs (HTTP-only)")
		}
	}
	return out, nil
}

func (c *authzCompiler) operation(path string, o *authzOperation, rule *authzRuleMatch) (conds, error) {
	http := []struct {
		name string
		in   []string
	}{
		{"hosts", o.Hosts}, {"notHosts", o.NotHosts}, {"methods", o.Methods}, {"notMethods", o.NotMethods},
		{"paths", o.Paths}, {"notPaths", o.NotPaths},
	}
	n := len(o.Ports) + len(o.NotPorts)
	for _, f := range http {
		n += len(f.in)
	}
	if n == 0 {
		return nil, fieldErrorf(path, "must set at least one field")
	}
	ports := func(ps []portString) []string {
		out := make([]string, len(ps))
		for i, p := range ps {
			out[i] = string(p)
		}
		return out
	}
	var out conds
	cd, ok, err := c.cond(attrDestPort, path+".ports", ports(o.Ports), path+".notPorts", ports(o.NotPorts))
	if err != nil {
		return nil, err
	}
	if ok {
		out = append(out, cd)
	}
	for _, f := range http {
		if err := checkNonEmpty(path+"."+f.name, f.in); err != nil {
			return nil, err
		}
		if f.name == "paths" || f.name == "notPaths" {
			for i, p := range f.in {
				if err := checkPathTemplate(fmt.Sprintf("%s.%s[%d]", path, f.name, i), p); err != nil {
					return nil, err
				}
			}
		}
		if len(f.in) > 0 {
			c.narrow(rule, path+"."+f.name, httpOnly)
		}
	}
	return out, nil
}

// when compiles one condition; ok is false when it was narrowed away.
func (c *authzCompiler) when(path string, w *authzCondition, rule *authzRuleMatch) (cond, bool, error) {
	if w.Key == "" {
		return cond{}, false, fieldErrorf(path+".key", "required")
	}
	if len(w.Values) == 0 && len(w.NotValues) == 0 {
		return cond{}, false, fieldErrorf(path, "set values or notValues for key %s", w.Key)
	}
	vp, np := path+".values", path+".notValues"
	l4 := map[string]attr{
		keySourceIP: attrSourceIP, keyRemoteIP: attrRemoteIP, keyNamespace: attrNamespace, keyServiceAccount: attrServiceAccount,
		keyTrustDomain: attrTrustDomain, keyPrincipal: attrPrincipal, keyDestIP: attrDestIP, keyDestPort: attrDestPort, keySNI: attrSNI,
	}
	if a, ok := l4[w.Key]; ok {
		return c.cond(a, vp, w.Values, np, w.NotValues)
	}
	if err := checkNonEmpty(vp, w.Values); err != nil {
		return cond{}, false, err
	}
	if err := checkNonEmpty(np, w.NotValues); err != nil {
		return cond{}, false, err
	}
	switch {
	case w.Key == "request.auth.principal", w.Key == "request.auth.audiences", w.Key == "request.auth.presenter":
		c.narrow(rule, path, w.Key+": "+httpOnly)
	case strings.HasPrefix(w.Key, "request.headers"), strings.HasPrefix(w.Key, "request.auth.claims"):
		if err := checkMapKey(path+".key", w.Key); err != nil {
			return cond{}, false, err
		}
		c.narrow(rule, path, w.Key+": "+httpOnly)
	case strings.HasPrefix(w.Key, "experimental.envoy.filters."):
		if err := checkMapKey(path+".key", w.Key); err != nil {
			return cond{}, false, err
		}
		c.narrow(rule, path, w.Key+": Envoy filter metadata, which meshproxy does not have")
	case w.Key == "destination.namespace":
		return cond{}, false, fieldErrorf(path+".key", "%s is replaced by metadata.namespace", w.Key)
	case strings.HasPrefix(w.Key, "destination.labels"):
		return cond{}, false, fieldErrorf(path+".key", "%s is replaced by the workload selector", w.Key)
	case w.Key == "destination.name", w.Key == "destination.user":
		return cond{}, false, fieldErrorf(path+".key", "%s was removed after v1alpha1", w.Key)
	default:
		return cond{}, false, fieldErrorf(path+".key", "unknown attribute %q", w.Key)
	}
	return cond{}, false, nil
}

// checkMapKey checks a key of the form a[b].
func checkMapKey(path, key string) error {
	open := strings.Index(key, "[")
	if strings.HasSuffix(key, "]") && open > 0 && open < len(key)-2 {
		return nil
	}
	return fieldErrorf(path, "%q: want the form name[key]", key)
}

func checkNonEmpty(path string, vs []string) error {
	for i, v := range vs {
		if v == "" {
			return fieldErrorf(fmt.Sprintf("%s[%d]", path, i), "must not be empty")
		}
	}
	return nil
}

// cond compiles the values and notValues of one attribute; ok is false
// when both are empty.
func (c *authzCompiler) cond(a attr, inPath string, in []string, outPath string, out []string) (cond, bool, error) {
	if len(in) == 0 && len(out) == 0 {
		return cond{}, false, nil
	}
	if a == attrServiceAccount {
		for _, l := range []struct {
			path string
			vs   []string
		}{{inPath, in}, {outPath, out}} {
			if len(l.vs) > 16 {
				return cond{}, false, fieldErrorf(l.path, "at most 16 service accounts")
			}
		}
	}
	cd := cond{attr: a}
	var err error
	if cd.in, err = c.values(a, inPath, in); err != nil {
		return cond{}, false, err
	}
	if cd.out, err = c.values(a, outPath, out); err != nil {
		return cond{}, false, err
	}
	return cd, true, nil
}

func (c *authzCompiler) values(a attr, path string, vs []string) ([]value, error) {
	out := make([]value, 0, len(vs))
	for i, s := range vs {
		p := fmt.Sprintf("%s[%d]", path, i)
		if s == "" {
			return nil, fieldErrorf(p, "must not be empty")
		}
		v, err := c.value(a, p, s)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, nil
}

func (c *authzCompiler) value(a attr, path, s string) (value, error) {
	switch a {
	case attrPrincipal:
		s = strings.TrimPrefix(s, "spiffe://")
		if rest, ok := strings.CutPrefix(s, defaultTrustDomain+"/"); ok {
			// As in Istio, "cluster.local" stands for the mesh's own trust domain.
			s = c.td.Name() + "/" + rest
		}
		return value{pat: parsePattern(s)}, nil
	case attrSNI:
		return value{pat: parsePattern(s)}, nil
	case attrNamespace:
		return value{pat: parseNamespace(s)}, nil
	case attrTrustDomain:
		if err := checkWildcard(s); err != nil {
			return value{}, fieldErrorf(path, "%v", err)
		}
		if strings.Contains(s, "/") {
			return value{}, fieldErrorf(path, "%q: a trust domain has no '/'", s)
		}
		if s == defaultTrustDomain {
			s = c.td.Name()
		}
		return value{pat: parsePattern(s)}, nil
	case attrServiceAccount:
		if strings.Contains(s, "*") {
			return value{}, fieldErrorf(path, "%q: wildcards are not allowed", s)
		}
		if len(s) > 320 {
			return value{}, fieldErrorf(path, "longer than 320 characters")
		}
		ns, sa, ok := strings.Cut(s, "/")
		if !ok {
			ns, sa = c.ns, s
		}
		if ns == "" || sa == "" || strings.Contains(sa, "/") {
			return value{}, fieldErrorf(path, "%q: want SERVICE-ACCOUNT or NAMESPACE/SERVICE-ACCOUNT", s)
		}
		return value{sa: [2]string{ns, sa}}, nil
	case attrSourceIP, attrRemoteIP, attrDestIP:
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return value{}, fieldErrorf(path, "%q: bad CIDR: %v", s, err)
			}
			if p.Addr().Is4In6() {
				p = netip.PrefixFrom(p.Addr().Unmap(), max(p.Bits()-96, 0))
			}
			return value{prefix: p.Masked()}, nil
		}
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return value{}, fieldErrorf(path, "%q: bad IP address", s)
		}
		ip = ip.Unmap()
		return value{prefix: netip.PrefixFrom(ip, ip.BitLen())}, nil
	case attrDestPort:
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil || n > 65535 {
			return value{}, fieldErrorf(path, "%q: want a port number 0-65535", s)
		}
		return value{port: uint16(n)}, nil
	}
	return value{}, fieldErrorf(path, "internal: unknown attribute")
}

// checkWildcard allows one * at the start or end only.
func checkWildcard(s string) error {
	n := strings.Count(s, "*")
	if n > 1 {
		return fmt.Errorf("%q: at most one wildcard", s)
	}
	if n == 1 && s != "*" && !strings.HasPrefix(s, "*") && !strings.HasSuffix(s, "*") {
		return fmt.Errorf("%q: a wildcard only at the start or end", s)
	}
	return nil
}

// parsePattern reads an Istio string match as Envoy's matcher does: "*" is
// any value, a leading * a suffix match, a trailing * a prefix match, and
// anything else (an inner * included) an exact match.
func parsePattern(s string) pattern {
	if s == "*" {
		return pattern{prefix: true, suffix: true, raw: s}
	}
	if rest, ok := strings.CutPrefix(s, "*"); ok {
		return pattern{s: rest, suffix: true, raw: s}
	}
	if rest, ok := strings.CutSuffix(s, "*"); ok {
		return pattern{s: rest, prefix: true, raw: s}
	}
	return pattern{s: s, raw: s}
}

// parseNamespace reads a namespace: Istio turns every * into ".*", so a
// namespace with an inner * is a glob.
func parseNamespace(s string) pattern {
	inner := strings.Trim(s, "*")
	if s == "*" || !strings.Contains(inner, "*") && strings.Count(s, "*") <= 1 {
		return parsePattern(s)
	}
	return pattern{raw: s, re: regexp.MustCompile("^" + globRegexp(s) + "$"), nsRe: regexp.MustCompile("/ns/" + globRegexp(s) + "/")}
}
