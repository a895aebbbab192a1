package policy

import "strings"

// A peer from a federated trust domain is trusted for its identity (its
// chain verified against that trust domain's bundle) but not yet allowed
// in: only an ALLOW rule that names its trust domain admits it. "Names"
// means a principals entry whose fixed part starts with "<trust domain>/",
// such as "other.org/ns/web/sa/client" or "other.org/ns/web/*" or
// "other.org/*". Wildcards that merely happen to match ("*", "*/sa/client"),
// namespaces and notPrincipals do not name it. DENY rules apply to foreign
// peers as to any other.

// isForeign reports whether r's peer is mesh mTLS from another trust domain
// than the workload's.
func isForeign(r Request) bool {
	return !r.Peer.IsZero() && !r.TrustDomain.IsZero() && r.Peer.TrustDomain() != r.TrustDomain
}

// authorizeForeign allows a foreign peer only by an ALLOW rule whose
// matching source names the peer's trust domain.
func (a *authzPolicies) authorizeForeign(k *conn, r Request) Decision {
	td := r.Peer.TrustDomain().Name()
	for _, al := range a.allow {
		for i := range al.rules {
			if al.rules[i].matchNaming(k, td) {
				return Decision{Allowed: true, Reason: ReasonAllowed, Policy: al.id()}
			}
		}
	}
	return Decision{Allowed: false, Reason: ReasonForeignTrustDomain}
}

// matchNaming is match, with the further condition that the matching
// source names trust domain td in one of its matching principals or
// trustDomains.
func (r *authzRuleMatch) matchNaming(k *conn, td string) bool {
	if !r.match(k, false) {
		return false
	}
	for _, s := range r.from {
		if s.match(k, false) && s.namesTrustDomain(k.principal, td) {
			return true
		}
	}
	return false
}

// namesTrustDomain reports whether one of the source's principals matches
// principal and spells out td as its trust domain, or one of its
// trustDomains is exactly td.
func (cs conds) namesTrustDomain(principal, td string) bool {
	for _, c := range cs {
		for _, v := range c.in {
			pt := v.pat
			switch c.attr {
			case attrPrincipal:
				if !pt.suffix && pt.re == nil && strings.HasPrefix(pt.s, td+"/") && pt.match(principal) {
					return true
				}
			case attrTrustDomain:
				if !pt.prefix && !pt.suffix && pt.s == td {
					return true
				}
			}
		}
	}
	return false
}
