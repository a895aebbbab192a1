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
func (a *authzPolicies) authorizeForeign(p peer, r Request) Decision {
	td := r.Peer.TrustDomain().Name()
	for _, al := range a.allow {
		for i := range al.rules {
			if al.rules[i].matchNaming(p, r.Port, td) {
				return Decision{Allowed: true, Reason: ReasonAllowed, Policy: al.id()}
			}
		}
	}
	return Decision{Allowed: false, Reason: ReasonForeignTrustDomain}
}

// matchNaming is match, with the further condition that the matching
// source names trust domain td in one of its matching principals.
func (r *authzRuleMatch) matchNaming(p peer, port uint16, td string) bool {
	if !r.match(p, port, false) {
		return false
	}
	for i := range r.from {
		s := &r.from[i]
		if s.match(p, false) && namesTrustDomain(s.principals, p.principal, td) {
			return true
		}
	}
	return false
}

// namesTrustDomain reports whether one of ps matches principal and spells
// out td as its trust domain.
func namesTrustDomain(ps []pattern, principal, td string) bool {
	for _, pt := range ps {
		if !pt.suffix && strings.HasPrefix(pt.s, td+"/") && pt.match(principal) {
			return true
		}
	}
	return false
}
