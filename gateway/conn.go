package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	fwd "github.com/meshproxy/meshproxy/proxy/forward"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/proxy/sniff"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
)

// Results of a gateway connection: the bounded values of the result label
// of meshproxy_gateway_connections_total.
const (
	ResultOK                      = "ok"
	ResultOverLimit               = "over_limit"                // --max-connections reached
	ResultDenied                  = "denied"                    // an AuthorizationPolicy refused the port
	ResultNotTLS                  = "not_tls"                   // a TLS port got no ClientHello
	ResultBadHello                = "bad_hello"                 // malformed, oversized or incomplete ClientHello
	ResultUnknownSNI              = "unknown_sni"               // no server on the port covers the SNI
	ResultNoRoute                 = "no_route"                  // the server has no route for the connection
	ResultNoCredential            = "no_credential"             // the server's credential (or client CA) is not loaded
	ResultHandshakeFailed         = "handshake_failed"          // the client's TLS handshake failed (MUTUAL: no or bad client certificate)
	ResultUpstreamUnreachable     = "upstream_unreachable"      // dialing the destination failed
	ResultUpstreamHandshakeFailed = "upstream_handshake_failed" // mesh mTLS to the destination failed (see handshakes_total)
	ResultNoIdentity              = "no_identity"               // no SVID loaded to originate mesh mTLS
)

// routeNone is the route label before a route is chosen.
const routeNone = "none"

// conn is one accepted connection from accept to close, with the label
// of the listener that accepted it.
type conn struct {
	*conntrack.Conn
	listener string
}

// refusal describes why a connection is closed, for the metric and the log.
type refusal struct {
	route  string
	result string
	server *server
	dest   string
	err    error
	attrs  []any
}

func (g *Gateway) refuse(t *conn, r refusal) {
	if r.route == "" {
		r.route = routeNone
	}
	metrics.GatewayConnections.WithLabelValues(t.listener, r.route, r.result).Inc()
	attrs := []any{"listener", t.listener, "source", t.Source, "reason", r.result}
	if r.server != nil {
		attrs = append(attrs, "gateway", r.server.gateway, "server", r.server.name)
	}
	if r.route != routeNone {
		attrs = append(attrs, "route", r.route)
	}
	if r.dest != "" {
		attrs = append(attrs, "destination", r.dest)
	}
	if r.err != nil {
		attrs = append(attrs, "err", r.err.Error())
	}
	g.log.Warn("connection refused", append(attrs, r.attrs...)...)
	t.Abort()
}

// handle routes one accepted connection.
func (g *Gateway) handle(l *listener, t *conn, c net.Conn) {
	pc := g.cfg.Load().ports[l.port]
	if pc == nil { // the port left the config as this connection arrived
		g.refuse(t, refusal{result: ResultNoRoute, err: errors.New("port no longer configured")})
		return
	}
	// The gateway's clients are outside the mesh: they have no principal,
	// but ipBlocks and destination rules apply to their addresses.
	if dec := g.pol.Current().Authorize(policy.Request{Port: l.port, Source: addrOf(c.RemoteAddr()), Dest: addrOf(c.LocalAddr())}); !dec.Allowed {
		metrics.PolicyDenials.WithLabelValues(dec.Reason).Inc()
		g.refuse(t, refusal{result: ResultDenied, attrs: []any{"policy", dec.Policy, "decision", dec.Reason}})
		return
	}
	if pc.tcp {
		s, r := pc.tcpRoute()
		if r == nil {
			g.refuse(t, refusal{result: ResultNoRoute, server: pc.servers[0]})
			return
		}
		g.toMesh(t, c, s, r)
		return
	}

	sc, hello, err := sniff.Sniff(c, g.opts.DetectTimeout)
	switch {
	case err != nil:
		g.refuse(t, refusal{result: ResultBadHello, err: err})
		return
	case hello.Kind == sniff.Plaintext:
		g.refuse(t, refusal{result: ResultNotTLS})
		return
	}
	sni := normalizeSNI(hello.SNI)
	if host, port, ok := parseOutboundSNI(sni); ok {
		if s := pc.server(host); s != nil && s.mode == modeAutoPassthrough {
			g.autoPassthrough(t, sc, s, host, port)
			return
		}
	}
	s := pc.server(sni)
	if s != nil && s.mode == modeAutoPassthrough {
		g.refuse(t, refusal{result: ResultNoRoute, server: s, attrs: []any{"sni", sni, "why", "AUTO_PASSTHROUGH needs the SNI outbound_.PORT_._.HOST"}})
		return
	}
	if s == nil {
		// The SNI is the client's word, so it is logged, never a label.
		g.refuse(t, refusal{result: ResultUnknownSNI, attrs: []any{"sni", sni}})
		return
	}
	r := s.route(l.port, sni)
	if r == nil {
		g.refuse(t, refusal{result: ResultNoRoute, server: s, attrs: []any{"sni", sni}})
		return
	}
	if s.mode == modePassthrough {
		d := r.pick()
		up, err := g.dial(t, d.addr)
		if err != nil {
			g.refuse(t, refusal{route: r.name, result: ResultUpstreamUnreachable, server: s, dest: d.addr, err: err})
			return
		}
		// sc replays the ClientHello: the destination sees the client's TLS untouched.
		g.pipe(t, sc, up, r, d.addr, mesh.ModePassthrough, spiffeid.ID{})
		return
	}

	var cfg *tls.Config
	if s.mode == modeIstioMutual {
		td, err := g.trustDomain()
		if err != nil {
			g.refuse(t, refusal{route: r.name, result: ResultNoIdentity, server: s, err: err})
			return
		}
		// Mesh mTLS into the gateway: its own SVID, a client SVID of the trust domain.
		cfg = tlsmgr.ServerConfig(g.src, tlsconfig.AuthorizeMemberOf(td))
	} else {
		cred := g.creds.get(s.credential)
		if cred == nil || (s.mode == modeMutual && cred.clientCAs == nil) {
			why := "credential " + s.credential + " is not loaded"
			if cred != nil {
				why = "MUTUAL needs " + s.credential + caSuffix + " (the client CA)"
			}
			g.refuse(t, refusal{route: r.name, result: ResultNoCredential, server: s, err: errors.New(why)})
			return
		}
		cfg = s.tlsConfig(cred)
	}
	tc := tls.Server(sc, cfg)
	ctx, cancel := context.WithTimeout(t.Context(), g.opts.HandshakeTimeout)
	err = tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		g.refuse(t, refusal{route: r.name, result: ResultHandshakeFailed, server: s, err: err, attrs: []any{"sni", sni}})
		return
	}
	g.toMesh(t, tc, s, r)
}

// toMesh sends a terminated (or plain TCP) connection to its route's
// destination over mesh mTLS with the gateway's own SVID, verifying the
// destination's SPIFFE ID from a DestinationRule covering the address
// reached, else any member of the trust domain. A DestinationRule with
// tls.mode DISABLE sends it in plaintext instead.
func (g *Gateway) toMesh(t *conn, down net.Conn, s *server, r *route) {
	d := r.pick()
	ref := refusal{route: r.name, server: s, dest: d.addr}
	if _, err := g.src.Certificate(); err != nil {
		ref.result, ref.err = ResultNoIdentity, err
		g.refuse(t, ref)
		return
	}
	up, err := g.dial(t, d.addr)
	if err != nil {
		ref.result, ref.err = ResultUpstreamUnreachable, err
		g.refuse(t, ref)
		return
	}
	var ids []spiffeid.ID
	remote := mesh.AddrPort(up.RemoteAddr())
	if rule := g.pol.Current().Outbound(remote); rule.Matched {
		if !rule.MTLS {
			g.pipe(t, down, up, r, d.addr, mesh.ModePlaintext, spiffeid.ID{})
			return
		}
		ids = rule.SANs
	}
	td, err := g.trustDomain()
	if err != nil && len(ids) == 0 {
		ref.result, ref.err = ResultNoIdentity, err
		g.refuse(t, ref)
		return
	}
	var sni string
	if _, err := netip.ParseAddr(d.host); err != nil {
		sni = tlsmgr.OutboundSNI(d.host, d.port)
	}
	tc, peer, err := mesh.Originate(t.Context(), up, g.meshTLS.Get(sni, ids, td), g.opts.HandshakeTimeout)
	if err != nil {
		ref.result, ref.err = ResultUpstreamHandshakeFailed, err
		var he *mesh.HandshakeError
		if errors.As(err, &he) {
			ref.err, ref.attrs = he.Err, []any{"handshake", he.Result}
		}
		g.refuse(t, ref)
		return
	}
	g.pipe(t, down, tc, r, d.addr, mesh.ModeMTLS, peer)
}

// dial opens the upstream connection for t and registers it for abort.
func (g *Gateway) dial(t *conn, addr string) (net.Conn, error) {
	return t.Dial(g.opts.Dialer.DialContext, addr, mesh.DefaultDialTimeout)
}

// pipe counts an allowed connection, forwards it and logs its end.
func (g *Gateway) pipe(t *conn, down, up net.Conn, r *route, dest, mode string, peer spiffeid.ID) {
	var peerID string
	if !peer.IsZero() {
		peerID = peer.String()
	}
	metrics.GatewayConnections.WithLabelValues(t.listener, r.name, ResultOK).Inc()
	t.Establish(dest, mode, peerID)
	g.log.Debug("connection open", "listener", t.listener, "source", t.Source, "route", r.name,
		"destination", dest, "mode", mode, "peer", peerID)
	err := fwd.Forward(down, up, &t.Stats, g.opts.IdleTimeout, t.Abort, metrics.GatewayBytes.WithLabelValues(t.listener))
	attrs := []any{"listener", t.listener, "source", t.Source, "route", r.name, "destination", dest, "mode", mode,
		"peer", peerID, "bytes_in", t.Stats.In.Load(), "bytes_out", t.Stats.Out.Load(),
		"duration", time.Since(t.Since).Round(time.Millisecond).String()}
	switch {
	case errors.Is(err, fwd.ErrIdle):
		g.log.Info("connection closed: idle timeout", attrs...)
	case err != nil:
		g.log.Debug("connection aborted", append(attrs, "err", err.Error())...)
	default:
		g.log.Debug("connection closed", attrs...)
	}
}

// addrOf is a TCP address's IP, invalid for anything else.
func addrOf(a net.Addr) netip.Addr {
	if ta, ok := a.(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(ta.IP); ok {
			return ip.Unmap()
		}
	}
	return netip.Addr{}
}

// autoPassthroughRoute labels connections routed by their SNI alone.
var autoPassthroughRoute = &route{name: "auto_passthrough", kind: "tls"}

// autoPassthrough forwards a mesh client's TLS untouched to the service its
// SNI names (outbound_.PORT_._.HOST), as Istio's east-west gateway does: the
// client's sidecar and the destination's run mTLS end to end.
func (g *Gateway) autoPassthrough(t *conn, sc net.Conn, s *server, host string, port uint16) {
	addr := joinHostPort(host, port)
	up, err := g.dial(t, addr)
	if err != nil {
		g.refuse(t, refusal{route: autoPassthroughRoute.name, result: ResultUpstreamUnreachable, server: s, dest: addr, err: err})
		return
	}
	g.pipe(t, sc, up, autoPassthroughRoute, addr, mesh.ModePassthrough, spiffeid.ID{})
}

// parseOutboundSNI reads Istio's outbound SNI, outbound_.PORT_.SUBSET_.HOST
// (the subset is not used).
func parseOutboundSNI(sni string) (host string, port uint16, ok bool) {
	rest, ok := strings.CutPrefix(sni, "outbound_.")
	if !ok {
		return "", 0, false
	}
	parts := strings.SplitN(rest, ".", 3)
	if len(parts) != 3 || !strings.HasSuffix(parts[0], "_") || !strings.HasSuffix(parts[1], "_") {
		return "", 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(parts[0], "_"), 10, 16)
	if err != nil || n == 0 || parts[2] == "" {
		return "", 0, false
	}
	return parts[2], uint16(n), true
}
