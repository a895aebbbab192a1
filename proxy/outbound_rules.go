package proxy

import (
	"net"
	"net/netip"
	"slices"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// handleOutboundExplicit sends one connection of an --outbound-explicit
// listener on. The DestinationRule covering the destination (its host
// name, else its address) applies as on captured outbound: a rejected
// origination rule refuses; connectionPool.tcp bounds the app connections
// (counted here, whether they then ride a pooled HBONE connection or not)
// and sets the dial; tls.mode SIMPLE or MUTUAL means the destination is not
// a mesh peer, so the sidecar originates TLS to it itself, never over
// HBONE. A SPIFFE ID on the listener (LISTEN=DEST#ID) names a mesh peer:
// mesh mTLS to that ID, whatever tls.mode says.
func (p *Proxy) handleOutboundExplicit(l *listener, t *conntrack.Conn, c net.Conn) {
	dest := l.spec.target
	var ids []spiffeid.ID
	if !l.spec.id.IsZero() {
		ids = []spiffeid.ID{l.spec.id}
	}
	rule := p.explicitRule(dest)
	if rule.Refuse {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionDestinationRuleRejected, dest: dest})
		return
	}
	release, ok := p.pools.acquire(rule.Pool)
	if !ok {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionConnectionPoolFull, dest: dest})
		return
	}
	defer release()
	if rule.Originate != nil && ids == nil {
		host, _, _ := nameAndPort(dest)
		p.originateTLS(t, c, dest, withDefaultSNI(rule.Originate, host), rule.Pool)
		return
	}
	p.originate(t, c, dest, l.sni, ids, ids == nil, rule.Pool)
}

// explicitRule is the DestinationRule setting for an explicit destination:
// by name (exact host, longest wildcard, "*") for HOST:PORT, by address
// for IP:PORT (mesh-wide hosts too when the address is in --mesh-cidrs).
// A name's resolved addresses are checked again once dialled (originate).
func (p *Proxy) explicitRule(dest string) policy.Outbound {
	snap := p.pol.Current()
	if host, port, ok := nameAndPort(dest); ok {
		return snap.OutboundName(host, port)
	}
	ap, err := netip.ParseAddrPort(dest)
	if err != nil {
		return policy.Outbound{}
	}
	ap = mesh.Unmap(ap)
	if slices.ContainsFunc(p.opts.meshCIDRs, func(pfx netip.Prefix) bool { return pfx.Contains(ap.Addr()) }) {
		return snap.OutboundMesh(ap)
	}
	return snap.Outbound(ap)
}

// ruleBySNI learns the name of a captured destination outside the mesh
// from the app's own TLS ClientHello and returns the DestinationRule that
// name matches (OutboundName), as Istio matches TLS traffic by SNI; byAddr
// stays when the app's first bytes are not a ClientHello with a server
// name. The bytes read are replayed: use the returned conn. ok is false
// when the connection was refused (a malformed or oversized ClientHello).
// It waits at most the detect timeout for the app's first bytes, so the
// caller asks only when a rule can match by name alone (MatchesByName).
func (p *Proxy) ruleBySNI(t *conntrack.Conn, c net.Conn, dst netip.AddrPort, byAddr policy.Outbound) (net.Conn, policy.Outbound, bool) {
	sc, res, err := sniff.Sniff(c, p.opts.DetectTimeout)
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionHandshakeFailed, dest: dst.String(), err: err})
		return sc, policy.Outbound{}, false
	}
	if res.Kind == sniff.Plaintext || res.SNI == "" {
		return sc, byAddr, true
	}
	rule := p.pol.Current().OutboundName(res.SNI, dst.Port())
	if !rule.Matched && rule.Pool == nil {
		return sc, byAddr, true
	}
	p.log.Debug("destination rule matched by the app's TLS server name", "dest", dst.String(), "sni", res.SNI)
	if rule.Originate != nil {
		rule.Originate = withDefaultSNI(rule.Originate, res.SNI)
	}
	return sc, rule, true
}

// withDefaultSNI returns o with its SNI set to name when the rule sets
// none; o itself is shared by the snapshot and never changed.
func withDefaultSNI(o *policy.Origination, name string) *policy.Origination {
	if o.SNI != "" || name == "" {
		return o
	}
	c := *o
	c.SNI = name
	return &c
}
