package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// handleOutbound sends one outbound connection on: with mesh mTLS where the
// destination is in the mesh, untouched otherwise.
func (p *Proxy) handleOutbound(l *listener, t *conntrack.Conn, c net.Conn) {
	if l.spec.kind == outboundExplicit {
		p.handleOutboundExplicit(l, t, c) // outbound_rules.go
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
	if !inCIDRs && !rule.Matched && rule.Pool == nil && snap.MatchesByName() {
		var ok bool
		if c, rule, ok = p.ruleBySNI(t, c, dst, rule); !ok { // outbound_rules.go
			return
		}
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
	// A captured destination may be a Service VIP that kube-proxy maps to
	// one endpoint per TCP connection: a pooled connection is keyed by it,
	// and the peer's inbound carries streams naming it to the endpoint the
	// connection reached (the alias, see hbone.go).
	p.originate(t, c, dst.String(), "", sans, false, rule.Pool)
}

// originate connects to dest and runs a mesh mTLS handshake, accepting a
// server presenting one of ids, or any member of our trust domain if ids is
// empty. With ruleSANs, ids come from the DestinationRule covering the
// address actually reached (an explicit destination may be a host name).
// pool (nil for none) sets the dial's timeout and TCP keepalive. In HBONE
// auto mode it first looks for a pooled connection to dest with room for a
// stream, and offers the HBONE ALPN on a new connection (see hbone.go),
// unless the peer recently refused dest's streams on one (a meshproxy
// server without aliases): then, and when such a refusal comes before any
// byte of this app connection was sent, it is per-connection mTLS.
func (p *Proxy) originate(t *conntrack.Conn, down net.Conn, dest, sni string, ids []spiffeid.ID, ruleSANs bool, pool *policy.TCPPool) {
	if p.opts.hbone.mode == HBONEAlways {
		p.originateHBONE(t, down, dest, sni, ids, ruleSANs)
		return
	}
	if p.opts.hbone.mode == HBONEAuto {
		td, _ := p.trustDomain()
		key := p.hboneKey(dest, sni, ids, td, ruleSANs)
		if !p.hbone.pool.refusedRecently(key) && !p.originateMesh(t, down, dest, sni, ids, ruleSANs, pool, key) {
			return
		}
	}
	p.originateMesh(t, down, dest, sni, ids, ruleSANs, pool, "")
}

// originateMesh is originate with key "" (per-connection mTLS) or the
// pooled connections' key (auto mode). fallback reports that the peer
// refused dest on a pooled connection before anything of down was sent:
// the caller goes per-connection instead.
func (p *Proxy) originateMesh(t *conntrack.Conn, down net.Conn, dest, sni string, ids []spiffeid.ID, ruleSANs bool, pool *policy.TCPPool, key string) (fallback bool) {
	auto := key != ""
	// finish ends this connection's dial for key (auto mode): app
	// connections that waited for it look at the pool again.
	finish := func(bool) {}
	if auto {
		for range maxPoolAttempts {
			done, fallback := p.originatePooled(t, down, key, dest)
			if done || fallback {
				return fallback
			}
			wait, f := p.hbone.pool.joinDial(key)
			if wait == nil {
				finish = f
				break
			}
			select {
			case <-wait:
			case <-t.Context().Done():
				p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionUnreachable, dest: dest, err: t.Context().Err()})
				return false
			}
		}
	}
	pooled := false
	defer func() { finish(pooled) }()
	var up net.Conn
	var err error
	if auto {
		// Not owned by this app connection until it proves direct: a
		// pooled connection outlives it.
		up, err = p.dialShared(t, dest, pool)
	} else {
		up, err = p.dialPool(t, dest, pool)
	}
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionUnreachable, dest: dest, err: err})
		return false
	}
	if ruleSANs {
		rule := p.pol.Current().Outbound(mesh.AddrPort(up.RemoteAddr()))
		if host, port, ok := nameAndPort(dest); ok && !rule.Matched {
			rule = p.pol.Current().OutboundName(host, port) // an explicit destination by name, or a wildcard host
		}
		if rule.Refuse || rule.Originate != nil { // an explicit destination always gets mesh mTLS
			_ = up.Close()
			p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionDestinationRuleRejected, dest: dest})
			return false
		}
		if rule.Matched && rule.MTLS {
			ids = rule.SANs
		}
	}
	td, err := p.trustDomain()
	if err != nil && len(ids) == 0 {
		if auto {
			up.Close()
		}
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionNoIdentity, dest: dest, err: err})
		return false
	}

	cfg := p.clientTLS.Get(sni, ids, td)
	if auto {
		cfg = p.hbone.pool.clientConfig(p.clientTLS, sni, ids, td, hb.ALPN, tlsmgr.ALPNIstio)
	}
	cork := hb.NewCorkConn(up)
	tc, peer, err := mesh.Originate(t.Context(), cork, cfg, p.opts.HandshakeTimeout)
	if err != nil {
		if auto {
			up.Close()
		}
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionHandshakeFailed, dest: dest, err: err})
		return false
	}
	if auto && tc.ConnectionState().NegotiatedProtocol == hb.ALPN {
		pooled = true
		fallback := p.originateNegotiated(t, down, tc, cork, peer, key, dest, func() { finish(true); finish = func(bool) {} })
		if fallback {
			pooled = false
		}
		return fallback
	}
	finish(false)
	finish = func(bool) {}
	if auto && !t.AddSocket(up) {
		return false
	}
	p.pipe(t, down, gatheringTLS{tc, cork}, dest, mesh.ModeMTLS, peer)
	return false
}

// dialShared opens a connection to addr for t, as dialPool does, without
// registering it for t's abort; the caller closes it on failure.
func (p *Proxy) dialShared(t *conntrack.Conn, addr string, pool *policy.TCPPool) (net.Conn, error) {
	timeout := mesh.DefaultDialTimeout
	if pool != nil {
		timeout = cmp.Or(pool.ConnectTimeout, timeout)
	}
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	c, err := p.opts.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if pool != nil {
		applyKeepalive(c, pool)
	}
	return c, nil
}

// originateNegotiated turns a mesh connection whose server selected the
// HBONE ALPN into a pooled connection, with this app connection as its
// first stream; pooled is called once others may use it. fallback: the
// server refused stream 1's destination (see originate); the connection
// is not pooled.
func (p *Proxy) originateNegotiated(t *conntrack.Conn, down net.Conn, tc *tls.Conn, cork *hb.CorkConn, peer spiffeid.ID, key, dest string, pooled func()) (fallback bool) {
	opts := p.hbone.pool.opts
	opts.Cork = cork
	hc := newHBONEConn(hb.NewClient(tc, opts), peer, tc.LocalAddr(), tc.RemoteAddr())
	s, authority, err := p.openStream(t, hc, dest)
	if err != nil {
		hc.c.Close()
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return false
	}
	if refusedDestination(s) {
		s.Close()
		hc.c.Close()
		p.hboneFallback(key, dest, hc, s)
		return true
	}
	if err := p.hbone.pool.add(key, hc); err != nil {
		s.Close()
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return false
	}
	pooled()
	p.pipeStream(t, down, s, hc, dest, authority)
	return false
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
