package proxy

import (
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// handleOutbound sends one outbound connection on: with mesh mTLS where the
// destination is in the mesh, untouched otherwise.
func (p *Proxy) handleOutbound(l *listener, t *conntrack.Conn, c net.Conn) {
	if l.spec.kind == outboundExplicit {
		var ids []spiffeid.ID
		if !l.spec.id.IsZero() {
			ids = []spiffeid.ID{l.spec.id}
		}
		p.originate(t, c, l.spec.target, l.sni, ids, ids == nil, nil)
		return
	}
	dst, err := p.opts.originalDst(c)
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionNoOriginalDst, err: err})
		return
	}
	dst = mesh.Unmap(dst)
	if dst.Addr().IsLoopback() || isSelf(l, c, dst) {
		// Capture rules exclude loopback, so arriving here means a loop.
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionLoop, dest: dst.String()})
		return
	}
	snap := p.pol.Current()
	inCIDRs := slices.ContainsFunc(p.opts.meshCIDRs, func(pfx netip.Prefix) bool { return pfx.Contains(dst.Addr()) })
	rule := snap.Outbound(dst)
	if inCIDRs { // mesh-wide DestinationRule hosts (*.local) cover mesh destinations
		rule = snap.OutboundMesh(dst)
	}
	if rule.Refuse {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionDestinationRuleRejected, dest: dst.String()})
		return
	}
	inMesh := rule.MTLS
	if !rule.Matched {
		inMesh = inCIDRs
	}
	release, ok := p.pools.acquire(rule.Pool)
	if !ok {
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionConnectionPoolFull, dest: dst.String()})
		return
	}
	defer release()
	if rule.Originate != nil {
		p.originateTLS(t, c, dst.String(), rule.Originate, rule.Pool)
		return
	}
	if !inMesh {
		up, err := p.dialPool(t, dst.String(), rule.Pool)
		if err != nil {
			p.refuse(t, refusal{mode: mesh.ModePassthrough, decision: DecisionUnreachable, dest: dst.String(), err: err})
			return
		}
		p.pipe(t, c, up, dst.String(), mesh.ModePassthrough, spiffeid.ID{})
		return
	}
	var sans []spiffeid.ID
	if rule.Matched {
		sans = rule.SANs
	}
	p.originate(t, c, dst.String(), "", sans, false, rule.Pool)
}

// originate connects to dest and runs a mesh mTLS handshake, accepting a
// server presenting one of ids, or any member of our trust domain if ids is
// empty. With ruleSANs, ids come from the DestinationRule covering the
// address actually reached (an explicit destination may be a host name).
// pool (nil for none) sets the dial's timeout and TCP keepalive.
func (p *Proxy) originate(t *conntrack.Conn, down net.Conn, dest, sni string, ids []spiffeid.ID, ruleSANs bool, pool *policy.TCPPool) {
	if p.opts.hbone.outbound {
		p.originateHBONE(t, down, dest, sni, ids, ruleSANs)
		return
	}
	up, err := p.dialPool(t, dest, pool)
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionUnreachable, dest: dest, err: err})
		return
	}
	if ruleSANs {
		rule := p.pol.Current().Outbound(mesh.AddrPort(up.RemoteAddr()))
		if host, port, ok := nameAndPort(dest); ok && !rule.Matched {
			rule = p.pol.Current().OutboundName(host, port) // an explicit destination by name, or a wildcard host
		}
		if rule.Refuse || rule.Originate != nil { // an explicit destination always gets mesh mTLS
			_ = up.Close()
			p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionDestinationRuleRejected, dest: dest})
			return
		}
		if rule.Matched && rule.MTLS {
			ids = rule.SANs
		}
	}
	td, err := p.trustDomain()
	if err != nil && len(ids) == 0 {
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionNoIdentity, dest: dest, err: err})
		return
	}

	tc, peer, err := mesh.Originate(t.Context(), up, p.clientTLS.Get(sni, ids, td), p.opts.HandshakeTimeout)
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionHandshakeFailed, dest: dest, err: err})
		return
	}
	p.pipe(t, down, tc, dest, mesh.ModeMTLS, peer)
}

// nameAndPort splits an explicit destination HOST:PORT whose host is a
// name, not an address.
func nameAndPort(dest string) (string, uint16, bool) {
	host, port, err := net.SplitHostPort(dest)
	if err != nil {
		return "", 0, false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return "", 0, false
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return "", 0, false
	}
	return host, uint16(n), true
}
