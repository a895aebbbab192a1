package policy

import (
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// authzAction is what an AuthorizationPolicy does when a rule matches.
type authzAction int

const (
	actionAllow authzAction = iota
	actionDeny
	actionAudit // decides nothing
)

func (a authzAction) String() string {
	switch a {
	case actionDeny:
		return "DENY"
	case actionAudit:
		return "AUDIT"
	}
	return "ALLOW"
}

// authzPolicy is one AuthorizationPolicy as meshproxy enforces it on TCP
// connections.
type authzPolicy struct {
	meta
	selector map[string]string // nil: every workload of the namespace (or mesh, in the root namespace)
	action   authzAction
	dryRun   bool // istio.io/dry-run: evaluated and counted, never enforced
	rules    []authzRuleMatch
	// failClosed is set when the policy stands in for a rejected document:
	// why it was rejected.
	failClosed string
}

func (a *authzPolicy) deny() bool { return a.action == actionDeny }

// authzRuleMatch is one rule: a source of from, an operation of to, and
// every when condition must match.
type authzRuleMatch struct {
	// never: an ALLOW rule that needs an attribute a TCP connection does not
	// have (an HTTP field): as in Istio, it matches nothing.
	never bool
	from  []conds // any of them; none = any source
	to    []conds // any of them; none = any operation
	when  conds
}

// conds is a conjunction of conditions.
type conds []cond

// attr is a connection attribute a condition tests.
type attr int

const (
	attrPrincipal attr = iota
	attrNamespace
	attrTrustDomain
	attrServiceAccount
	attrSourceIP // source.ipBlocks, source.ip: the peer address
	attrRemoteIP // remoteIpBlocks, remote.ip: the same peer address at L4 (no proxy protocol)
	attrDestIP
	attrDestPort
	attrSNI
)

// cond is one attribute test: (any of in, when set) and none of out.
type cond struct {
	attr    attr
	in, out []value
}

// value is one Istio value of a condition: a string pattern, an address
// range or a port, depending on the attribute.
type value struct {
	pat    pattern
	prefix netip.Prefix
	port   uint16
	sa     [2]string // service account: namespace, name
}

// pattern is an Istio string match: exact, "prefix*", "*suffix" or "*"
// (any non-empty value). A namespace pattern may hold further wildcards and
// is then matched by re.
type pattern struct {
	s              string
	prefix, suffix bool
	re             *regexp.Regexp // namespaces with an inner *: the whole pattern as a glob
	nsRe           *regexp.Regexp // and its search form in a principal, /ns/GLOB/
	raw            string
}

func (p pattern) match(v string) bool {
	switch {
	case p.re != nil:
		return p.re.MatchString(v)
	case p.prefix && p.suffix: // "*": any non-empty value
		return v != ""
	case p.prefix:
		return strings.HasPrefix(v, p.s)
	case p.suffix:
		return strings.HasSuffix(v, p.s)
	}
	return v == p.s
}

func (p pattern) String() string { return p.raw }

// conn is a connection's attributes as policies see them.
type conn struct {
	principal   string // Istio form td/ns/NS/sa/SA; "" for a plaintext peer
	namespace   string // "" when not mesh mTLS or the ID has no /ns/NS/sa/SA path
	trustDomain string
	id          spiffeid.ID
	source      netip.Addr
	dest        netip.Addr
	port        uint16
	sni         string
}

func connOf(r Request) conn {
	c := conn{port: r.Port, source: r.Source.Unmap(), dest: r.Dest.Unmap(), sni: r.SNI, id: r.Peer}
	if r.Peer.IsZero() {
		return c
	}
	c.principal = r.Peer.TrustDomain().Name() + r.Peer.Path()
	c.trustDomain = r.Peer.TrustDomain().Name()
	if seg := strings.Split(r.Peer.Path(), "/"); len(seg) == 5 && seg[1] == "ns" && seg[3] == "sa" {
		c.namespace = seg[2]
	}
	return c
}

func anyPattern(vs []value, v string) bool {
	if v == "" { // a plaintext peer has no principal, namespace or trust domain to match
		return false
	}
	for _, x := range vs {
		if x.pat.match(v) {
			return true
		}
	}
	return false
}

func anyPrefix(vs []value, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	for _, x := range vs {
		if x.prefix.Contains(a) {
			return true
		}
	}
	return false
}

// any reports whether one of vs holds for the connection. deny tells how a
// namespace is matched (see match).
func (c *cond) any(vs []value, k *conn, refuses bool) bool {
	switch c.attr {
	case attrPrincipal, attrTrustDomain, attrSNI:
		v := k.principal
		if c.attr == attrTrustDomain {
			v = k.trustDomain
		} else if c.attr == attrSNI {
			v = k.sni
		}
		return anyPattern(vs, v)
	case attrNamespace:
		return anyPattern(vs, k.namespace) || (refuses && anyNamespaceIn(vs, k.principal))
	case attrServiceAccount:
		return anyServiceAccount(vs, k.id)
	case attrSourceIP, attrRemoteIP:
		return anyPrefix(vs, k.source)
	case attrDestIP:
		return anyPrefix(vs, k.dest)
	case attrDestPort:
		return slices.ContainsFunc(vs, func(x value) bool { return x.port == k.port })
	}
	return false
}

// match reports whether the condition holds. A namespace that refuses (one
// of a DENY rule's values, or an ALLOW rule's notValues) is matched as
// Istio does, against /ns/NS/ anywhere in the principal, so an ID of an
// unusual shape cannot slip past it; one that admits needs the
// /ns/NS/sa/SA form.
func (c *cond) match(k *conn, deny bool) bool {
	if len(c.in) > 0 && !c.any(c.in, k, deny) {
		return false
	}
	return len(c.out) == 0 || !c.any(c.out, k, !deny)
}

func (cs conds) match(k *conn, deny bool) bool {
	for i := range cs {
		if !cs[i].match(k, deny) {
			return false
		}
	}
	return true
}

// anyNamespaceIn reports whether one of vs matches principal as Istio's
// namespace regex ".*/ns/PATTERN/.*" does. Linear in the principal.
func anyNamespaceIn(vs []value, principal string) bool {
	i := strings.Index(principal, "/ns/")
	if i < 0 {
		return false
	}
	for _, v := range vs {
		pt := v.pat
		var ok bool
		switch {
		case pt.re != nil:
			ok = pt.nsRe.MatchString(principal)
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

// globRegexp turns an Istio namespace glob into a regular expression body:
// every * is any sequence, the rest literal.
func globRegexp(s string) string {
	parts := strings.Split(s, "*")
	for i, p := range parts {
		parts[i] = regexp.QuoteMeta(p)
	}
	return strings.Join(parts, ".*")
}

// anyServiceAccount matches Istio's serviceAccounts form "ns/sa" against
// an ID spiffe://TD/ns/NS/…/sa/SA[/…], as Istio's regex does.
func anyServiceAccount(vs []value, id spiffeid.ID) bool {
	if id.IsZero() {
		return false
	}
	seg := strings.Split(id.Path(), "/")
	for _, v := range vs {
		for i := 1; i+1 < len(seg); i++ {
			if seg[i] != "ns" || seg[i+1] != v.sa[0] {
				continue
			}
			for j := i + 2; j+1 < len(seg); j++ {
				if seg[j] == "sa" && seg[j+1] == v.sa[1] {
					return true
				}
			}
		}
	}
	return false
}

func (r *authzRuleMatch) match(k *conn, deny bool) bool {
	if r.never || !r.when.match(k, deny) {
		return false
	}
	from := len(r.from) == 0
	for i := range r.from {
		if r.from[i].match(k, deny) {
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
		if r.to[i].match(k, deny) {
			return true
		}
	}
	return false
}

// match reports whether any rule matches; a policy without rules matches nothing.
func (a *authzPolicy) match(k *conn) bool {
	for i := range a.rules {
		if a.rules[i].match(k, a.deny()) {
			return true
		}
	}
	return false
}

// authzPolicies are the AuthorizationPolicies that apply to one workload.
type authzPolicies struct {
	deny, allow []*authzPolicy
	// dryRun are the istio.io/dry-run policies (ALLOW and DENY): evaluated
	// and counted, never enforced.
	dryRun []*authzPolicy
	audit  []*authzPolicy
}

// selectAuthz keeps the policies of our namespace and the root namespace
// whose selector (if any) matches our labels, by role, in a stable order.
func selectAuthz(all []*authzPolicy, wl Workload, rootNS string) authzPolicies {
	var out authzPolicies
	for _, p := range all {
		if p.namespace != wl.Namespace && p.namespace != rootNS {
			continue
		}
		if p.selector != nil && !selects(p.selector, wl.Labels) {
			continue
		}
		switch {
		case p.action == actionAudit:
			out.audit = append(out.audit, p)
		case p.dryRun:
			out.dryRun = append(out.dryRun, p)
		case p.deny():
			out.deny = append(out.deny, p)
		default:
			out.allow = append(out.allow, p)
		}
	}
	return out
}

func (a *authzPolicies) authorize(r Request) Decision {
	k := connOf(r)
	for _, d := range a.deny {
		if d.match(&k) {
			return Decision{Allowed: false, Reason: ReasonDeniedByPolicy, Policy: d.id()}
		}
	}
	if isForeign(r) {
		return a.authorizeForeign(&k, r)
	}
	if len(a.allow) == 0 {
		return Decision{Allowed: true, Reason: ReasonAllowed}
	}
	for _, al := range a.allow {
		if al.match(&k) {
			return Decision{Allowed: true, Reason: ReasonAllowed, Policy: al.id()}
		}
	}
	return Decision{Allowed: false, Reason: ReasonNoAllowMatch}
}

// shadow evaluates the dry-run policies as Istio's shadow rules do: what
// each would decide on its own (a DENY policy denies what it matches, an
// ALLOW policy denies what it does not).
func (a *authzPolicies) shadow(r Request) []DryRun {
	if len(a.dryRun) == 0 {
		return nil
	}
	k := connOf(r)
	out := make([]DryRun, 0, len(a.dryRun))
	for _, p := range a.dryRun {
		allowed := p.match(&k) != p.deny()
		out = append(out, DryRun{Policy: p.id(), Action: p.action.String(), Allowed: allowed})
	}
	return out
}

type authzView struct {
	Policy     string          `json:"policy"`
	Action     string          `json:"action"`
	DryRun     bool            `json:"dry_run,omitempty"`
	FailClosed string          `json:"fail_closed,omitempty"`
	Rules      []authzRuleView `json:"rules"`
}

type authzRuleView struct {
	Never bool       `json:"never_matches,omitempty"`
	From  []condView `json:"from,omitempty"`
	To    []condView `json:"to,omitempty"`
	When  condView   `json:"when,omitempty"`
}

// condView is a conjunction: attribute → values and notValues.
type condView map[string]condValues

type condValues struct {
	Values    []string `json:"values,omitempty"`
	NotValues []string `json:"not_values,omitempty"`
}

var attrNames = [...]string{
	attrPrincipal: "principals", attrNamespace: "namespaces", attrTrustDomain: "trust_domains",
	attrServiceAccount: "service_accounts", attrSourceIP: "source_ip", attrRemoteIP: "remote_ip",
	attrDestIP: "destination_ip", attrDestPort: "ports", attrSNI: "sni",
}

func (v value) String(a attr) string {
	switch a {
	case attrServiceAccount:
		return v.sa[0] + "/" + v.sa[1]
	case attrSourceIP, attrRemoteIP, attrDestIP:
		return v.prefix.String()
	case attrDestPort:
		return strconv.Itoa(int(v.port))
	}
	return v.pat.String()
}

func (cs conds) view() condView {
	if len(cs) == 0 {
		return nil
	}
	out := condView{}
	strs := func(a attr, vs []value) []string {
		var s []string
		for _, v := range vs {
			s = append(s, v.String(a))
		}
		return s
	}
	for _, c := range cs {
		name := attrNames[c.attr]
		cur := out[name]
		cur.Values = append(cur.Values, strs(c.attr, c.in)...)
		cur.NotValues = append(cur.NotValues, strs(c.attr, c.out)...)
		out[name] = cur
	}
	return out
}

// viewAny is view, with {} (any connection) for an empty conjunction.
func (cs conds) viewAny() condView {
	if len(cs) == 0 {
		return condView{}
	}
	return cs.view()
}

func (p *authzPolicy) view() authzView {
	v := authzView{Policy: p.id(), Action: p.action.String(), DryRun: p.dryRun, FailClosed: p.failClosed, Rules: []authzRuleView{}}
	for _, r := range p.rules {
		rv := authzRuleView{Never: r.never, When: r.when.view()}
		for _, f := range r.from {
			rv.From = append(rv.From, f.viewAny())
		}
		for _, t := range r.to {
			rv.To = append(rv.To, t.viewAny())
		}
		v.Rules = append(v.Rules, rv)
	}
	return v
}

// view lists the policies in force: DENY, then ALLOW, then dry-run, then AUDIT.
func (a *authzPolicies) view() []authzView {
	out := []authzView{}
	for _, l := range [][]*authzPolicy{a.deny, a.allow, a.dryRun, a.audit} {
		for _, p := range l {
			out = append(out, p.view())
		}
	}
	return out
}
