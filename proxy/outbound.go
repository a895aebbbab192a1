package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"slices"

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
		var ids []spiffeid.ID
		if !l.spec.id.IsZero() {
			ids = []spiffeid.ID{l.spec.id}
		}
		p.originate(t, c, l.spec.target, l.sni, ids, ids == nil)
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
	rule := p.pol.Current().Outbound(dst)
	inMesh := rule.MTLS
	if !rule.Matched {
		inMesh = slices.ContainsFunc(p.opts.meshCIDRs, func(pfx netip.Prefix) bool { return pfx.Contains(dst.Addr()) })
	}
	if !inMesh {
		up, err := p.dial(t, dst.String())
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
	p.originate(t, c, dst.String(), "", sans, false)
}

// originate connects to dest and runs a mesh mTLS handshake, accepting a
// server presenting one of ids, or any member of our trust domain if ids is
// empty. With ruleSANs, ids come from the DestinationRule covering the
// address actually reached (an explicit destination may be a host name).
// In HBONE auto mode it first looks for a pooled connection to dest with
// room for a stream, and offers the HBONE ALPN on a new connection (see
// hbone.go).
func (p *Proxy) originate(t *conntrack.Conn, down net.Conn, dest, sni string, ids []spiffeid.ID, ruleSANs bool) {
	if p.opts.hbone.mode == HBONEAlways {
		p.originateHBONE(t, down, dest, sni, ids, ruleSANs)
		return
	}
	auto := p.opts.hbone.mode == HBONEAuto
	var key string
	// finish ends this connection's dial for key (auto mode): app
	// connections that waited for it look at the pool again.
	finish := func(bool) {}
	if auto {
		td, _ := p.trustDomain()
		key = p.hboneKey(dest, sni, ids, td, ruleSANs)
		for range maxPoolAttempts {
			if p.originatePooled(t, down, key, dest) {
				return
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
				return
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
		up, err = p.dialShared(t, dest)
	} else {
		up, err = p.dial(t, dest)
	}
	if err != nil {
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionUnreachable, dest: dest, err: err})
		return
	}
	if ruleSANs {
		if rule := p.pol.Current().Outbound(mesh.AddrPort(up.RemoteAddr())); rule.Matched && rule.MTLS {
			ids = rule.SANs
		}
	}
	td, err := p.trustDomain()
	if err != nil && len(ids) == 0 {
		if auto {
			up.Close()
		}
		p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionNoIdentity, dest: dest, err: err})
		return
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
		return
	}
	if auto && tc.ConnectionState().NegotiatedProtocol == hb.ALPN {
		pooled = true
		p.originateNegotiated(t, down, tc, cork, peer, key, dest, func() { finish(true); finish = func(bool) {} })
		return
	}
	finish(false)
	finish = func(bool) {}
	if auto && !t.AddSocket(up) {
		return
	}
	p.pipe(t, down, corkedTLS{tc, cork}, dest, mesh.ModeMTLS, peer)
}

// dialShared opens a connection to addr for t without registering it for
// t's abort; the caller closes it on failure.
func (p *Proxy) dialShared(t *conntrack.Conn, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(t.Context(), mesh.DefaultDialTimeout)
	defer cancel()
	c, err := p.opts.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c, nil
}

// originateNegotiated turns a mesh connection whose server selected the
// HBONE ALPN into a pooled connection, with this app connection as its
// first stream; pooled is called once others may use it.
func (p *Proxy) originateNegotiated(t *conntrack.Conn, down net.Conn, tc *tls.Conn, cork *hb.CorkConn, peer spiffeid.ID, key, dest string, pooled func()) {
	opts := p.hbone.pool.opts
	opts.Cork = cork
	hc := &hboneConn{c: hb.NewClient(tc, opts), peer: peer, local: tc.LocalAddr(), remote: tc.RemoteAddr()}
	s, authority, err := p.openStream(t, hc, dest)
	if err != nil {
		hc.c.Close()
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return
	}
	if err := p.hbone.pool.add(key, hc); err != nil {
		s.Close()
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return
	}
	pooled()
	p.pipeStream(t, down, s, hc, dest, authority)
}
