package policy

import (
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// authzPolicy is one validated L4 AuthorizationPolicy.
type authzPolicy struct {
	meta
	selector map[string]string // nil: every workload of the namespace (or mesh, in the root namespace)
	deny     bool
	rules    []authzRuleMatch
}

type authzRuleMatch struct {
	from []sourceMatch // any of them; none = any source
	to   []portMatch   // any of them; none = any port
}

// sourceMatch is one from[].source: every set field must match.
type sourceMatch struct {
	principals, notPrincipals, namespaces, notNamespaces []pattern
}

// portMatch is one to[].operation: every set field must match.
type portMatch struct {
	ports, notPorts []uint16
}

// pattern is an Istio string match: exact, "prefix*", "*suffix" or "*".
type pattern struct {
	s              string
	prefix, suffix bool
}

func (p pattern) match(v string) bool {
	switch {
	case p.prefix && p.suffix: // "*": any non-empty value
		return v != ""
	case p.prefix:
		return strings.HasPrefix(v, p.s)
	case p.suffix:
		return strings.HasSuffix(v, p.s)
	}
	return v == p.s
}

func (p pattern) String() string {
	switch {
	case p.prefix && p.suffix:
		return "*"
	case p.prefix:
		return p.s + "*"
	case p.suffix:
		return "*" + p.s
	}
	return p.s
}

func parsePattern(path, s string) (pattern, error) {
	if s == "" {
		return pattern{}, fieldErrorf(path, "must not be empty")
	}
	if s == "*" {
		return pattern{prefix: true, suffix: true}, nil
	}
	p := pattern{s: s}
	if rest, ok := strings.CutPrefix(s, "*"); ok {
		p = pattern{s: rest, suffix: true}
	} else if rest, ok := strings.CutSuffix(s, "*"); ok {
		p = pattern{s: rest, prefix: true}
	}
	if strings.Contains(p.s, "*") {
		return pattern{}, fieldErrorf(path, "%q: only one leading or trailing * is supported", s)
	}
	return p, nil
}

// parsePrincipal parses an Istio principal ("cluster.local/ns/NS/sa/SA",
// also accepted with a spiffe:// scheme). As in Istio, the trust domain
// "cluster.local" stands for the mesh's own trust domain.
func parsePrincipal(path, s string, td spiffeid.TrustDomain) (pattern, error) {
	s = strings.TrimPrefix(s, "spiffe://")
	if rest, ok := strings.CutPrefix(s, defaultTrustDomain+"/"); ok {
		s = td.Name() + "/" + rest
	}
	return parsePattern(path, s)
}

func compileAuthz(m meta, spec *authzSpec, td spiffeid.TrustDomain) (*authzPolicy, error) {
	p := &authzPolicy{meta: m, selector: spec.Selector.labels()}
	switch spec.Action {
	case "", "ALLOW":
	case "DENY":
		p.deny = true
	case "CUSTOM", "AUDIT":
		return nil, fieldErrorf("spec.action", "%s is not supported by meshproxy (ALLOW and DENY are)", spec.Action)
	default:
		return nil, fieldErrorf("spec.action", "unknown action %q (want ALLOW or DENY)", spec.Action)
	}
	for i, r := range spec.Rules {
		path := fmt.Sprintf("spec.rules[%d]", i)
		rule, err := compileRule(path, r, td)
		if err != nil {
			return nil, err
		}
		p.rules = append(p.rules, rule)
	}
	return p, nil
}

func compileRule(path string, r authzRule, td spiffeid.TrustDomain) (authzRuleMatch, error) {
	var out authzRuleMatch
	if r.From != nil && len(r.From) == 0 {
		return out, fieldErrorf(path+".from", "must not be empty when set")
	}
	if r.To != nil && len(r.To) == 0 {
		return out, fieldErrorf(path+".to", "must not be empty when set")
	}
	for j, f := range r.From {
		fp := fmt.Sprintf("%s.from[%d].source", path, j)
		if f.Source == nil {
			return out, fieldErrorf(fp, "required")
		}
		src, err := compileSource(fp, f.Source, td)
		if err != nil {
			return out, err
		}
		out.from = append(out.from, src)
	}
	for j, t := range r.To {
		tp := fmt.Sprintf("%s.to[%d].operation", path, j)
		if t.Operation == nil {
			return out, fieldErrorf(tp, "required")
		}
		op := portMatch{ports: ports(t.Operation.Ports), notPorts: ports(t.Operation.NotPorts)}
		if len(op.ports) == 0 && len(op.notPorts) == 0 {
			return out, fieldErrorf(tp, "must set ports or notPorts")
		}
		out.to = append(out.to, op)
	}
	return out, nil
}

func compileSource(path string, s *authzSource, td spiffeid.TrustDomain) (sourceMatch, error) {
	var out sourceMatch
	var err error
	for _, f := range []struct {
		name  string
		in    []string
		out   *[]pattern
		parse func(string, string) (pattern, error)
	}{
		{"principals", s.Principals, &out.principals, func(p, v string) (pattern, error) { return parsePrincipal(p, v, td) }},
		{"notPrincipals", s.NotPrincipals, &out.notPrincipals, func(p, v string) (pattern, error) { return parsePrincipal(p, v, td) }},
		{"namespaces", s.Namespaces, &out.namespaces, parsePattern},
		{"notNamespaces", s.NotNamespaces, &out.notNamespaces, parsePattern},
	} {
		for i, v := range f.in {
			var pt pattern
			if pt, err = f.parse(fmt.Sprintf("%s.%s[%d]", path, f.name, i), v); err != nil {
				return out, err
			}
			*f.out = append(*f.out, pt)
		}
	}
	if len(out.principals)+len(out.notPrincipals)+len(out.namespaces)+len(out.notNamespaces) == 0 {
		return out, fieldErrorf(path, "must set at least one of principals, notPrincipals, namespaces, notNamespaces")
	}
	return out, nil
}

func ports(in []portValue) []uint16 {
	out := make([]uint16, 0, len(in))
	for _, p := range in {
		out = append(out, uint16(p))
	}
	return out
}

// peer is the authenticated identity of a request, as policies see it.
type peer struct {
	principal string // Istio form td/ns/NS/sa/SA; "" for a plaintext peer
	namespace string // "" when not mesh mTLS or the ID has no /ns/NS/sa/SA path
}

func peerOf(id spiffeid.ID) peer {
	if id.IsZero() {
		return peer{}
	}
	p := peer{principal: id.TrustDomain().Name() + id.Path()}
	if seg := strings.Split(id.Path(), "/"); len(seg) == 5 && seg[1] == "ns" && seg[3] == "sa" {
		p.namespace = seg[2]
	}
	return p
}

func anyMatch(ps []pattern, v string) bool {
	if v == "" { // a plaintext peer has no principal or namespace to match
		return false
	}
	for _, p := range ps {
		if p.match(v) {
			return true
		}
	}
	return false
}

// match reports whether the source matches p. A namespace that only
// refuses (a DENY rule's namespaces, an ALLOW rule's notNamespaces) is
// matched as Istio does, against /ns/NS/ anywhere in the principal, so an
// ID of an unusual shape cannot slip past it; one that admits needs the
// /ns/NS/sa/SA form.
func (s *sourceMatch) match(p peer, deny bool) bool {
	nsIn := anyMatch(s.namespaces, p.namespace)
	if deny && !nsIn {
		nsIn = anyNamespaceIn(s.namespaces, p.principal)
	}
	nsOut := anyMatch(s.notNamespaces, p.namespace)
	if !deny && !nsOut {
		nsOut = anyNamespaceIn(s.notNamespaces, p.principal)
	}
	return (len(s.principals) == 0 || anyMatch(s.principals, p.principal)) &&
		!anyMatch(s.notPrincipals, p.principal) &&
		(len(s.namespaces) == 0 || nsIn) &&
		!nsOut
}

// anyNamespaceIn reports whether one of ps matches principal as Istio's
// namespace regex ".*/ns/PATTERN/.*" does. Linear in the principal.
func anyNamespaceIn(ps []pattern, principal string) bool {
	i := strings.Index(principal, "/ns/")
	if i < 0 {
		return false
	}
	for _, pt := range ps {
		var ok bool
		switch {
		case pt.prefix && pt.suffix: // "*"
			ok = strings.Contains(principal[i+4:], "/")
		case pt.prefix: // ".*/ns/P.*/.*": the first /ns/P leaves the most room
			if j := strings.Index(principal, "/ns/"+pt.s); j >= 0 {
				ok = strings.Contains(principal[j+4+len(pt.s):], "/")
			}
		case pt.suffix: // ".*/ns/.*S/.*": after the first /ns/
			ok = strings.Contains(principal[i+4:], pt.s+"/")
		default:
			ok = strings.Contains(principal, "/ns/"+pt.s+"/")
		}
		if ok {
			return true
		}
	}
	return false
}

func (o *portMatch) match(port uint16) bool {
	has := func(ps []uint16) bool {
		for _, p := range ps {
			if p == port {
				return true
			}
		}
		return false
	}
	return (len(o.ports) == 0 || has(o.ports)) && !has(o.notPorts)
}

func (r *authzRuleMatch) match(p peer, port uint16, deny bool) bool {
	from := len(r.from) == 0
	for i := range r.from {
		if r.from[i].match(p, deny) {
			from = true
			break
		}
	}
	if !from {
		return false
	}
	if len(r.to) == 0 {
		return true
	}
	for i := range r.to {
		if r.to[i].match(port) {
			return true
		}
	}
	return false
}

// match reports whether any rule matches; a policy without rules matches nothing.
func (a *authzPolicy) match(p peer, port uint16) bool {
	for i := range a.rules {
		if a.rules[i].match(p, port, a.deny) {
			return true
		}
	}
	return false
}

// authzPolicies are the AuthorizationPolicies that apply to one workload.
type authzPolicies struct {
	deny, allow []*authzPolicy
}

// selectAuthz keeps the policies of our namespace and the root namespace
// whose selector (if any) matches our labels, DENY and ALLOW apart, in a
// stable order.
func selectAuthz(all []*authzPolicy, wl Workload, rootNS string) authzPolicies {
	var out authzPolicies
	for _, p := range all {
		if p.namespace != wl.Namespace && p.namespace != rootNS {
			continue
		}
		if p.selector != nil && !selects(p.selector, wl.Labels) {
			continue
		}
		if p.deny {
			out.deny = append(out.deny, p)
		} else {
			out.allow = append(out.allow, p)
		}
	}
	return out
}

func (a *authzPolicies) authorize(r Request) Decision {
	p := peerOf(r.Peer)
	for _, d := range a.deny {
		if d.match(p, r.Port) {
			return Decision{Allowed: false, Reason: ReasonDeniedByPolicy, Policy: d.id()}
		}
	}
	if isForeign(r) {
		return a.authorizeForeign(p, r)
	}
	if len(a.allow) == 0 {
		return Decision{Allowed: true, Reason: ReasonAllowed}
	}
	for _, al := range a.allow {
		if al.match(p, r.Port) {
			return Decision{Allowed: true, Reason: ReasonAllowed, Policy: al.id()}
		}
	}
	return Decision{Allowed: false, Reason: ReasonNoAllowMatch}
}

type authzView struct {
	Policy string          `json:"policy"`
	Action string          `json:"action"`
	Rules  []authzRuleView `json:"rules"`
}

type authzRuleView struct {
	From []sourceView `json:"from,omitempty"`
	To   []portView   `json:"to,omitempty"`
}

type sourceView struct {
	Principals    []string `json:"principals,omitempty"`
	NotPrincipals []string `json:"not_principals,omitempty"`
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"not_namespaces,omitempty"`
}

type portView struct {
	Ports    []uint16 `json:"ports,omitempty"`
	NotPorts []uint16 `json:"not_ports,omitempty"`
}

func (a *authzPolicies) view() []authzView {
	out := []authzView{}
	strs := func(ps []pattern) []string {
		var s []string
		for _, p := range ps {
			s = append(s, p.String())
		}
		return s
	}
	for _, p := range append(append([]*authzPolicy{}, a.deny...), a.allow...) {
		v := authzView{Policy: p.id(), Action: "ALLOW", Rules: []authzRuleView{}}
		if p.deny {
			v.Action = "DENY"
		}
		for _, r := range p.rules {
			rv := authzRuleView{}
			for _, s := range r.from {
				rv.From = append(rv.From, sourceView{strs(s.principals), strs(s.notPrincipals), strs(s.namespaces), strs(s.notNamespaces)})
			}
			for _, o := range r.to {
				rv.To = append(rv.To, portView{o.ports, o.notPorts})
			}
			v.Rules = append(v.Rules, rv)
		}
		out = append(out, v)
	}
	return out
}
