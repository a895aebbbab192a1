package proxy

import (
	"context"
	"crypto/tls"
	"net"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// handleInbound enforces the port's mTLS mode on one inbound connection and
// forwards it to the app.
func (p *Proxy) handleInbound(l *listener, t *tracked, c net.Conn) {
	dest, port := l.spec.target, l.appPort
	if l.spec.kind == inboundTransparent {
		dst, err := p.opts.originalDst(c)
		if err != nil {
			p.refuse(t, refusal{mode: ModeUnknown, decision: DecisionNoOriginalDst, err: err})
			return
		}
		if isSelf(l, c, dst) {
			p.refuse(t, refusal{mode: ModeUnknown, decision: DecisionLoop, dest: dst.String()})
			return
		}
		dest, port = dst.String(), dst.Port()
	}

	snap := p.pol.Current()
	mode := snap.InboundMode(port)
	if mode == policy.ModeDisable {
		// Not inspected at all: the first byte goes to the app as it came.
		p.authorizeAndForward(l, t, snap, c, dest, port, ModePassthrough, spiffeid.ID{})
		return
	}

	sc, res, err := sniff.Sniff(c, p.opts.detectTimeout)
	if err != nil {
		result := observeHandshake(DirInbound, time.Time{}, err)
		p.refuse(t, refusal{mode: ModeUnknown, decision: DecisionHandshakeFailed, dest: dest,
			err: &handshakeError{result, err}})
		return
	}
	switch res.Kind {
	case sniff.MeshTLS:
		start := time.Now()
		tc := tls.Server(sc, p.serverTLS)
		ctx, cancel := context.WithTimeout(t.Context(), p.opts.handshakeTimeout)
		err := tc.HandshakeContext(ctx)
		cancel()
		result := observeHandshake(DirInbound, start, err)
		if err != nil {
			p.refuse(t, refusal{mode: ModeMTLS, decision: DecisionHandshakeFailed, dest: dest,
				err: &handshakeError{result, err}})
			return
		}
		peer, err := tlsmgr.PeerID(tc.ConnectionState())
		if err != nil { // verified already, so this cannot happen; refuse rather than guess
			p.refuse(t, refusal{mode: ModeMTLS, decision: DecisionHandshakeFailed, dest: dest, err: err})
			return
		}
		p.authorizeAndForward(l, t, snap, tc, dest, port, ModeMTLS, peer)
	default:
		m := res.Kind.String()
		if mode == policy.ModeStrict {
			p.refuse(t, refusal{mode: m, decision: DecisionMTLSRequired, dest: dest})
			return
		}
		p.authorizeAndForward(l, t, snap, sc, dest, port, m, spiffeid.ID{})
	}
}

// authorizeAndForward applies the AuthorizationPolicies to the peer (zero
// for anything but mesh mTLS) and, if allowed, connects to the app (see
// dialApp for the source address).
func (p *Proxy) authorizeAndForward(l *listener, t *tracked, snap *policy.Snapshot, down net.Conn, dest string, port uint16, mode string, peer spiffeid.ID) {
	if !p.authorize(t, snap, dest, port, mode, peer) {
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
func (p *Proxy) authorize(t *tracked, snap *policy.Snapshot, dest string, port uint16, mode string, peer spiffeid.ID) bool {
	req := policy.Request{Peer: peer, Port: port}
	if !peer.IsZero() {
		// A peer of a federated trust domain needs a policy naming it.
		req.TrustDomain, _ = p.trustDomain()
	}
	dec := snap.Authorize(req)
	if !dec.Allowed {
		metrics.PolicyDenials.WithLabelValues(dec.Reason).Inc()
		p.refuse(t, refusal{mode: mode, decision: dec.Reason, dest: dest, peer: peer, policy: dec.Policy})
		return false
	}
	return true
}

// handshakeError carries the handshake result label into the log line.
type handshakeError struct {
	result string
	err    error
}

func (e *handshakeError) Error() string { return e.result + ": " + e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }
