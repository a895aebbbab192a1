package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// handleInbound enforces the port's mTLS mode on one inbound connection and
// forwards it to the app.
func (p *Proxy) handleInbound(l *listener, t *conntrack.Conn, c net.Conn) {
	dest, port := l.spec.target, l.appPort
	if l.spec.kind == inboundTransparent {
		dst, err := p.opts.originalDst(c)
		if err != nil {
			p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionNoOriginalDst, err: err})
			return
		}
		if isSelf(l, c, dst) {
			p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionLoop, dest: dst.String()})
			return
		}
		dest, port = dst.String(), dst.Port()
	}

	snap := p.pol.Current()
	mode := snap.InboundMode(port)
	if mode == policy.ModeDisable {
		// Not inspected at all: the first byte goes to the app as it came.
		p.authorizeAndForward(l, t, snap, c, dest, port, mesh.ModePassthrough, spiffeid.ID{}, "")
		return
	}

	sc, res, err := sniff.Sniff(c, p.opts.DetectTimeout)
	if err != nil {
		result := mesh.ObserveHandshake(mesh.DirInbound, time.Time{}, err)
		p.refuse(t, refusal{mode: mesh.ModeUnknown, decision: DecisionHandshakeFailed, dest: dest,
			err: &mesh.HandshakeError{Result: result, Err: err}})
		return
	}
	switch res.Kind {
	case sniff.MeshTLS:
		start := time.Now()
		cork := hb.NewCorkConn(sc)
		tc := tls.Server(cork, p.serverTLS)
		ctx, cancel := context.WithTimeout(t.Context(), p.opts.HandshakeTimeout)
		err := mesh.Handshake(ctx, tc)
		cancel()
		result := mesh.ObserveHandshake(mesh.DirInbound, start, err)
		if err != nil {
			p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionHandshakeFailed, dest: dest,
				err: &mesh.HandshakeError{Result: result, Err: err}})
			return
		}
		peer, err := tlsmgr.PeerID(tc.ConnectionState())
		if err != nil { // verified already, so this cannot happen; refuse rather than guess
			p.refuse(t, refusal{mode: mesh.ModeMTLS, decision: DecisionHandshakeFailed, dest: dest, err: err})
			return
		}
		if tc.ConnectionState().NegotiatedProtocol == hb.ALPN {
			// A meshproxy client pools app connections on this one: each
			// stream names its destination and is authorized on its own.
			arrived := mesh.AddrPort(c.LocalAddr()).Addr()
			if ap, err := netip.ParseAddrPort(dest); err == nil && l.spec.kind == inboundTransparent {
				arrived = mesh.Unmap(ap).Addr()
			}
			p.serveHBONEConn(l, t, tc, peer, cork, arrived, dest)
			return
		}
		p.authorizeAndForward(l, t, snap, gatheringTLS{tc, cork}, dest, port, mesh.ModeMTLS, peer, res.SNI)
	default:
		m := res.Kind.String()
		if mode == policy.ModeStrict {
			p.refuse(t, refusal{mode: m, decision: DecisionMTLSRequired, dest: dest})
			return
		}
		p.authorizeAndForward(l, t, snap, sc, dest, port, m, spiffeid.ID{}, res.SNI)
	}
}

// authorizeAndForward applies the AuthorizationPolicies to the peer (zero
// for anything but mesh mTLS) and, if allowed, connects to the app (see
// dialApp for the source address).
func (p *Proxy) authorizeAndForward(l *listener, t *conntrack.Conn, snap *policy.Snapshot, down net.Conn, dest string, port uint16, mode string, peer spiffeid.ID, sni string) {
	if !p.authorize(t, snap, dest, port, mode, peer, sni) {
		return
	}
	up, err := p.dialApp(l, t, dest)
	if err != nil {
		p.refuse(t, refusal{mode: mode, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return
	}
	p.pipe(t, down, up, dest, mode, peer)
}

// authorize applies the AuthorizationPolicies of snap to a connection from
// peer (zero for anything but mesh mTLS) to port; a denial is counted,
// logged and the connection refused. The :15006 and HBONE paths share it.
// The peer's address (ipBlocks, remoteIpBlocks) is the accepted socket's
// remote address (with TPROXY the real client); the destination address is
// dest (the original destination, or an explicit listener's app address).
func (p *Proxy) authorize(t *conntrack.Conn, snap *policy.Snapshot, dest string, port uint16, mode string, peer spiffeid.ID, sni string) bool {
	return p.authorizeOr(t, snap, dest, port, mode, peer, sni, nil)
}

// authorizeOr is authorize that calls denied (if not nil) with the denial's
// reason before the connection is refused.
func (p *Proxy) authorizeOr(t *conntrack.Conn, snap *policy.Snapshot, dest string, port uint16, mode string, peer spiffeid.ID, sni string, denied func(reason string)) bool {
	req := policy.Request{Peer: peer, Port: port, SNI: sni}
	if ap, err := netip.ParseAddrPort(t.Source); err == nil {
		req.Source = ap.Addr().Unmap()
	}
	if ap, err := netip.ParseAddrPort(dest); err == nil {
		req.Dest = ap.Addr().Unmap()
	}
	if !peer.IsZero() {
		// A peer of a federated trust domain needs a policy naming it.
		req.TrustDomain, _ = p.trustDomain()
	}
	dec := snap.Authorize(req)
	if !dec.Allowed {
		metrics.PolicyDenials.WithLabelValues(dec.Reason).Inc()
		if denied != nil {
			denied(dec.Reason)
		}
		p.refuse(t, refusal{mode: mode, decision: dec.Reason, dest: dest, peer: peer, policy: dec.Policy})
		return false
	}
	return true
}
