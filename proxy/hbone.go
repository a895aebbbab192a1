package proxy

// HBONE: app connections carried as HTTP/2 CONNECT streams over one mesh
// mTLS connection per peer pair (proxy/hbone is the data path), so a new
// app connection costs a stream, not a handshake.
//
// How a pooled connection comes to be (HBONEMode):
//
//   - auto (the command's default): the client offers ALPN
//     "meshproxy-hbone" before "istio" on its normal mesh mTLS connection.
//     A meshproxy server selects it and the connection becomes a pooled
//     HBONE connection; the app connection that made it rides as stream 1,
//     so there is no extra round trip. An Envoy/Istio sidecar never
//     selects it: the connection stays per-connection mTLS, as before.
//     Later app connections to the same destination (and expected
//     identity) open streams on the pooled connections while they have
//     room, and make a new one otherwise. Captured destinations pool
//     too (a Service VIP:port is the key; the server's alias below maps
//     it to the endpoint). A pooled connection takes no new streams after
//     hbonePoolMaxAge or hbonePoolMaxStreams, so app connections to a
//     Service spread over its endpoints as kube-proxy picks one per new
//     connection. A pooled stream refused with 403 bad_destination, or
//     403 without a decision (a meshproxy server without aliases), is
//     retried per-connection before any app byte is sent, and that
//     destination stays per-connection for refusedMemory.
//   - always: outbound mesh traffic goes to the peer's HBONE listener
//     (port 15008 of the destination, ALPN h2, Istio's own format) with no
//     fallback, as ztunnel does.
//   - never: per-connection mTLS only, and the negotiation is not offered
//     nor accepted.
//
// Inbound, a stream arrives on the HBONE listener (WithHBONE, :15008, ALPN
// h2) or on a mesh connection to :15006 or an explicit inbound listener
// that negotiated "meshproxy-hbone". HBONE must not become an open relay,
// so the :authority is only accepted when it names this workload:
//
//   - an explicit inbound listener (WithInboundExplicit) by its bound
//     address (with an unspecified bind address: the IP the HBONE
//     connection arrived on) or by its app address written exactly; the
//     stream goes to that listener's app and policy is evaluated for the
//     app's port, as on the listener itself;
//   - with the transparent inbound listener (WithInboundTransparent): the
//     IP the HBONE connection arrived on (the pod IP) and any port except
//     Istio's reserved 15000-15099 and this proxy's own listener ports;
//     loopback and unspecified addresses never. The stream goes to that
//     address and policy is evaluated for its port, as on :15006.
//
// A pooled connection negotiated on :15006 or an explicit inbound
// listener also has an alias, because for captured traffic the client
// names what its app dialed (a Service VIP:port) while kube-proxy sent the
// TCP connection to one endpoint (this pod's IP and the target port, which
// may differ). The :authority of stream 1 stands for the destination the
// connection itself reached: on :15006 its original destination, checked
// by the transparent rules above; on an explicit listener, that listener's
// app. Stream 1 and every later stream on the same connection naming the
// same IP:PORT go there, with the same policy evaluation (port = the real
// target port). Other authorities follow the rules above unchanged. This
// is no open relay: the alias reaches only where the kernel already routed
// this client's connection (what a per-connection mesh connection would
// reach), and only on that connection. Streams opened before stream 1 get
// no alias, and the HBONE listener (:15008, Istio's format) has none: no
// captured connection arrives there. The client keys pooled connections by
// destination, so VIP:80 and VIP:81 never share one.
//
// Anything else is refused with 403 (decision bad_destination). Each
// accepted stream then passes the same AuthorizationPolicy check as a mesh
// mTLS connection on :15006 (Proxy.authorize: same policy_denials_total
// reasons, log line and connections_total decision), with the peer's
// SPIFFE ID from the HBONE connection. HBONE is mesh mTLS, so STRICT and
// PERMISSIVE accept it; DISABLE accepts it too on :15008, as ztunnel does
// (a DISABLE port of :15006 is not sniffed, so nothing is negotiated
// there). Denied: 403; app unreachable: 503. A refusal's answer carries
// the decision in the meshproxy-decision header (hb.DecisionHeader).
//
// Half-close works both ways: either side may end its direction first
// (END_STREAM) and the other keeps flowing. An abort resets the stream
// (RST_STREAM), never a clean end. Shutdown sends GOAWAY: open streams
// finish, new ones go elsewhere.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/internal/ports"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// HBONEPort is the port of a peer's HBONE listener (docs/CONTRACT.md: 15008).
const HBONEPort = ports.HBONE

// ModeHBONE is the mode label and PeerInfo.Mode of app connections carried
// over HBONE (HTTP/2 CONNECT streams on a pooled mesh mTLS connection).
const ModeHBONE = "hbone"

// Transports of mesh connections (the transport label of
// meshproxy_mesh_connections_active).
const (
	TransportPooled = "pooled" // an HBONE connection carrying app connections as streams
	TransportDirect = "direct" // one mesh mTLS connection per app connection
)

// Decisions of HBONE streams, besides the common ones.
const (
	DecisionBadRequest     = "bad_request"     // not a CONNECT, or a malformed :authority
	DecisionBadDestination = "bad_destination" // :authority is not an address of this workload
	DecisionPeerRefused    = "peer_refused"    // outbound: the peer's HBONE listener answered the CONNECT with an error
)

// HBONEMode is when outbound mesh traffic is pooled over HBONE.
type HBONEMode string

// HBONE modes (see the notes above).
const (
	HBONEAuto   HBONEMode = "auto"   // negotiated on the mesh connection; per-connection mTLS with peers that do not speak it
	HBONEAlways HBONEMode = "always" // to the peer's HBONE listener (15008), no fallback
	HBONENever  HBONEMode = "never"  // per-connection mTLS only
)

// ParseHBONEMode parses auto, always or never.
func ParseHBONEMode(s string) (HBONEMode, error) {
	switch m := HBONEMode(s); m {
	case HBONEAuto, HBONEAlways, HBONENever:
		return m, nil
	}
	return "", fmt.Errorf("hbone mode %q: want auto, always or never", s)
}

// Defaults of HBONE.
const (
	DefaultHBONEMaxStreams = hb.DefaultMaxStreams // streams one inbound HBONE connection carries at once
	DefaultHBONEPoolIdle   = 90 * time.Second     // an outbound pooled connection with no streams is closed after this
	// hboneServerIdle is longer than the pool's idle timeout so the
	// client, which knows when it stops using a connection, closes first.
	hboneServerIdle = 10 * time.Minute
	hboneALPN       = "h2"
	// hboneKeepAlive finds a peer that vanished without closing (PING
	// after this long without a frame while streams are open).
	hboneKeepAlive = 30 * time.Second
)

// reservedPorts are Istio's own ports (15000-15099), never an HBONE target
// of the transparent inbound path.
func reservedPort(port uint16) bool { return port >= 15000 && port <= 15099 }

type hboneOptions struct {
	mode       HBONEMode
	peers      map[string]string // destination → its HBONE listener
	maxStreams uint32
	poolIdle   time.Duration
	// a pooled outbound connection's bounds (hbonePoolMaxAge,
	// hbonePoolMaxStreams; tests shorten them)
	maxAge         time.Duration
	maxPoolStreams int
}

func defaultHBONEOptions() hboneOptions {
	return hboneOptions{mode: HBONENever, maxStreams: DefaultHBONEMaxStreams, poolIdle: DefaultHBONEPoolIdle,
		maxAge: hbonePoolMaxAge, maxPoolStreams: hbonePoolMaxStreams}
}

// WithHBONE adds the inbound HBONE listener on addr (":15008" in a pod):
// mesh mTLS with ALPN h2 carrying one HTTP/2 CONNECT stream per app
// connection. A stream's :authority must name this workload (see the
// package's HBONE notes in hbone.go) and passes the same authorization as
// the :15006 path.
func WithHBONE(addr string) Option {
	return func(o *options) {
		o.listeners = append(o.listeners, listenerSpec{kind: inboundHBONE, listen: addr})
	}
}

// WithHBONEMode sets when outbound mesh traffic is pooled over HBONE, and
// whether inbound mesh connections may negotiate it (not with never). The
// package default is never; meshproxy run defaults to auto.
func WithHBONEMode(m HBONEMode) Option {
	return func(o *options) { o.hbone.mode = m }
}

// WithHBONEOutbound is WithHBONEMode(HBONEAlways) when on, else
// WithHBONEMode(HBONENever).
func WithHBONEOutbound(on bool) Option {
	if on {
		return WithHBONEMode(HBONEAlways)
	}
	return WithHBONEMode(HBONENever)
}

// WithHBONEPeer says that the HBONE listener for the destination dest
// (host:port, as in WithOutboundExplicit or an original destination) is
// at hbone (host:port) rather than dest's host port 15008.
func WithHBONEPeer(dest, hbone string) Option {
	return func(o *options) {
		m := make(map[string]string, len(o.hbone.peers)+1)
		for k, v := range o.hbone.peers {
			m[k] = v
		}
		m[dest] = hbone
		o.hbone.peers = m
	}
}

// WithHBONEMaxStreams sets how many streams one inbound HBONE connection
// carries at once (SETTINGS_MAX_CONCURRENT_STREAMS, default 100); clients
// open another connection past it.
func WithHBONEMaxStreams(n uint32) Option {
	return func(o *options) {
		if n > 0 {
			o.hbone.maxStreams = n
		}
	}
}

// WithHBONEPoolIdle sets after how long without streams an outbound pooled
// HBONE connection is closed (default 90s).
func WithHBONEPoolIdle(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.hbone.poolIdle = d
		}
	}
}

// hbone is a Proxy's HBONE state: the inbound connections (for GOAWAY at
// shutdown) and the outbound pool.
type hbone struct {
	serverTLS *tls.Config // the HBONE listener's (ALPN h2)
	server    hb.Options
	pool      *hbonePool

	mu       sync.Mutex
	inbound  map[*hb.Conn]struct{}
	draining bool
}

func newHBONE(src tlsmgr.Source, pol mesh.PolicySource, o options) *hbone {
	cfg := mesh.ServerConfig(src, pol)
	cfg.NextProtos = []string{hboneALPN}
	applyKeyExchange(cfg, o.keyExchange)
	return &hbone{
		serverTLS: cfg,
		server: hb.Options{MaxStreams: o.hbone.maxStreams, IdleTimeout: hboneServerIdle,
			PrefaceTimeout: o.HandshakeTimeout, KeepAlive: hboneKeepAlive},
		pool: newHBONEPool(hb.Options{IdleTimeout: o.hbone.poolIdle, KeepAlive: hboneKeepAlive}, o.Log.With("component", "proxy"),
			o.hbone.maxAge, o.hbone.maxPoolStreams),
		inbound: make(map[*hb.Conn]struct{}),
	}
}

// track registers an inbound connection until it closes; false if the
// proxy is shutting down.
func (h *hbone) track(c *hb.Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.draining {
		return false
	}
	h.inbound[c] = struct{}{}
	return true
}

func (h *hbone) untrack(c *hb.Conn) {
	h.mu.Lock()
	delete(h.inbound, c)
	h.mu.Unlock()
}

// shutdown asks every inbound HBONE connection to finish (GOAWAY: open
// streams complete, no new ones) and returns at once.
func (h *hbone) shutdown() {
	h.mu.Lock()
	h.draining = true
	cs := make([]*hb.Conn, 0, len(h.inbound))
	for c := range h.inbound {
		cs = append(cs, c)
	}
	h.mu.Unlock()
	for _, c := range cs {
		c.Shutdown()
	}
}

// serveHBONE runs the mesh mTLS handshake on an accepted HBONE listener
// connection and serves its CONNECT streams until it closes.
func (p *Proxy) serveHBONE(l *listener, t *conntrack.Conn, c net.Conn) {
	start := time.Now()
	cork := hb.NewCorkConn(c)
	tc := tls.Server(cork, p.hbone.serverTLS)
	ctx, cancel := context.WithTimeout(t.Context(), p.opts.HandshakeTimeout)
	err := mesh.Handshake(ctx, tc)
	cancel()
	result := mesh.ObserveHandshake(mesh.DirInbound, start, err)
	if err != nil {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionHandshakeFailed,
			err: &mesh.HandshakeError{Result: result, Err: err}})
		return
	}
	cs := tc.ConnectionState()
	peer, err := tlsmgr.PeerID(cs)
	if err == nil && cs.NegotiatedProtocol != hboneALPN {
		err = fmt.Errorf("client did not negotiate ALPN %q", hboneALPN)
	}
	if err != nil {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionHandshakeFailed, err: err})
		return
	}
	// No alias here: nothing routed this connection to an app, its
	// streams name their destinations themselves.
	p.serveHBONEConn(l, t, tc, peer, cork, mesh.AddrPort(tc.LocalAddr()).Addr(), "")
}

// serveHBONEConn serves the CONNECT streams of an inbound pooled
// connection, handshaken already (on the HBONE listener, or negotiated on
// a mesh listener), until it closes. cork is the socket under tc; local
// is the address the connection was made to (for a redirected one, its
// original destination's: REDIRECT may hand it over on another address of
// the interface). reached is where the connection itself was going (its
// original destination, or the explicit listener's app), the target of
// stream 1's alias; "" for none (the HBONE listener).
func (p *Proxy) serveHBONEConn(l *listener, t *conntrack.Conn, tc *tls.Conn, peer spiffeid.ID, cork *hb.CorkConn, local netip.Addr, reached string) {
	// The carrier is not an app connection: its streams are counted, it is
	// counted as a pooled mesh connection instead.
	active := metrics.ConnectionsActive.WithLabelValues(mesh.DirInbound)
	active.Dec()
	defer active.Inc()
	opts := p.hbone.server
	opts.Cork = cork
	hc := hb.NewServer(tc, opts)
	if !p.hbone.track(hc) {
		return
	}
	defer p.hbone.untrack(hc)
	gauge := metrics.MeshConnections.WithLabelValues(mesh.DirInbound, TransportPooled)
	gauge.Inc()
	defer gauge.Dec()
	p.log.Debug("hbone connection open", "source", t.Source, "peer", peer.String())
	stop := context.AfterFunc(t.Context(), func() { hc.Close() })
	defer stop()
	alias := &hboneAlias{to: reached}
	_ = hc.Serve(func(s *hb.Stream) { p.serveHBONEStream(l, s, local, peer, alias) })
	if err := hc.Err(); err != nil {
		p.log.Warn("hbone connection failed", "source", t.Source, "peer", peer.String(), "err", err.Error())
		return
	}
	p.log.Debug("hbone connection closed", "source", t.Source, "peer", peer.String())
}

// serveHBONEStream tracks one CONNECT stream as a connection of its own
// (limits, /peers, drain) and answers it.
func (p *Proxy) serveHBONEStream(l *listener, s *hb.Stream, local netip.Addr, peer spiffeid.ID, alias *hboneAlias) {
	err := p.conns.Admit(p.base, mesh.DirInbound, s, metrics.ConnectionsActive.WithLabelValues(mesh.DirInbound), func(t *conntrack.Conn) {
		p.handleHBONEStream(l, t, s, local, peer, alias)
	})
	if err != nil {
		if errors.Is(err, conntrack.ErrOverLimit) {
			metrics.Connections.WithLabelValues(mesh.DirInbound, ModeHBONE, DecisionOverLimit).Inc()
			p.refusals.Warn(DecisionOverLimit, "connection refused", "direction", mesh.DirInbound, "listener", l.name, "source", s.RemoteAddr().String(),
				"mode", ModeHBONE, "peer", peer.String(), "reason", DecisionOverLimit, "max_connections", p.opts.MaxConns)
		}
		s.SetFailStatus(http.StatusServiceUnavailable)
		s.SetFailReason(DecisionOverLimit)
		s.Close()
	}
}

// handleHBONEStream checks a CONNECT stream's destination and the policy,
// then connects it to the app. A refusal closes the stream, which answers
// its fail status and, in hb.DecisionHeader, the decision.
func (p *Proxy) handleHBONEStream(l *listener, t *conntrack.Conn, s *hb.Stream, local netip.Addr, peer spiffeid.ID, alias *hboneAlias) {
	if s.Method() != http.MethodConnect {
		s.SetFailStatus(http.StatusMethodNotAllowed)
		s.SetFailReason(DecisionBadRequest)
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionBadRequest, dest: s.Authority(), peer: peer,
			err: fmt.Errorf("method %q, want CONNECT", s.Method())})
		return
	}
	authority, aliased := alias.resolve(s)
	dest, port, err := p.hboneTarget(authority, local)
	if err != nil {
		decision, status := DecisionBadDestination, http.StatusForbidden
		if errors.Is(err, errBadAuthority) {
			decision, status = DecisionBadRequest, http.StatusBadRequest
		}
		if aliased {
			err = fmt.Errorf("carried to this connection's own destination: %w", err)
		}
		s.SetFailStatus(status)
		s.SetFailReason(decision)
		p.refuse(t, refusal{mode: ModeHBONE, decision: decision, dest: s.Authority(), peer: peer, err: err})
		return
	}
	s.SetFailStatus(http.StatusForbidden)
	if !p.authorizeOr(t, p.pol.Current(), dest, port, ModeHBONE, peer, "", s.SetFailReason) {
		return
	}
	s.SetFailStatus(http.StatusServiceUnavailable)
	s.SetFailReason(DecisionUnreachable)
	up, err := p.dialApp(l, t, dest)
	if err != nil {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return
	}
	if err := s.Respond(http.StatusOK); err != nil {
		p.log.Debug("hbone stream gone before it was answered", "source", t.Source, "destination", dest, "err", err)
		return
	}
	p.pipe(t, s, up, dest, ModeHBONE, peer)
}

// hboneAlias is what a pooled connection negotiated on a mesh listener
// learns from its stream 1: the :authority the client named (for a
// captured connection, what the client's app dialed, such as a Service
// VIP) stands for the destination the connection itself reached (its
// original destination: the endpoint the client's kernel picked, or the
// explicit listener's app). See the notes at the top of this file.
type hboneAlias struct {
	to string // the connection's own destination; "" for no alias

	mu   sync.Mutex
	from netip.AddrPort // stream 1's :authority, once seen
}

// resolve returns the authority to check for s: the connection's own
// destination if s is stream 1 or names what stream 1 named, else s's.
func (a *hboneAlias) resolve(s *hb.Stream) (authority string, aliased bool) {
	if a == nil || a.to == "" {
		return s.Authority(), false
	}
	ap, err := netip.ParseAddrPort(s.Authority())
	if err != nil || ap.Port() == 0 {
		return s.Authority(), false
	}
	ap = mesh.Unmap(ap)
	a.mu.Lock()
	defer a.mu.Unlock()
	if s.ID() == 1 && !a.from.IsValid() {
		a.from = ap
	}
	if a.from.IsValid() && ap == a.from {
		return a.to, true
	}
	return s.Authority(), false
}

var errBadAuthority = errors.New("malformed :authority")

// hboneTarget maps a CONNECT :authority to the app address to dial and the
// port policy is evaluated for, or refuses it (see the notes above).
// local is the address the HBONE connection arrived on.
func (p *Proxy) hboneTarget(authority string, local netip.Addr) (string, uint16, error) {
	p.mu.Lock()
	ls := p.listeners
	p.mu.Unlock()
	for _, l := range ls {
		if l.spec.kind == inboundExplicit && authority == l.spec.target {
			return l.spec.target, l.appPort, nil
		}
	}
	ap, err := netip.ParseAddrPort(authority)
	if err != nil || ap.Port() == 0 {
		return "", 0, fmt.Errorf("%w %q: want IP:PORT", errBadAuthority, authority)
	}
	ap = mesh.Unmap(ap)
	transparent := false
	for _, l := range ls {
		switch l.spec.kind {
		case inboundExplicit:
			bound := mesh.AddrPort(l.ln.Addr())
			if ap.Port() == bound.Port() && (ap.Addr() == bound.Addr() || bound.Addr().IsUnspecified() && ap.Addr() == local) {
				return l.spec.target, l.appPort, nil
			}
		case inboundTransparent:
			transparent = true
		}
	}
	if !transparent {
		return "", 0, fmt.Errorf("%s is not an inbound listener or app of this workload", authority)
	}
	switch {
	case ap.Addr() != local || !local.IsValid():
		return "", 0, fmt.Errorf("%s is not the address this connection arrived on (%s)", authority, local)
	case ap.Addr().IsLoopback() || ap.Addr().IsUnspecified():
		return "", 0, fmt.Errorf("%s: loopback and unspecified addresses are not reachable over HBONE", authority)
	case reservedPort(ap.Port()):
		return "", 0, fmt.Errorf("%s: ports 15000-15099 are the proxy's own", authority)
	}
	for _, l := range ls {
		if l.port == ap.Port() {
			return "", 0, fmt.Errorf("%s: port %d is a listener of this proxy", authority, ap.Port())
		}
	}
	return ap.String(), ap.Port(), nil
}

// hbonePeerAddr is where the HBONE listener for dest is: as configured by
// WithHBONEPeer, else dest's host on HBONEPort.
func (p *Proxy) hbonePeerAddr(dest string) (string, error) {
	if a, ok := p.opts.hbone.peers[dest]; ok {
		return a, nil
	}
	host, _, err := net.SplitHostPort(dest)
	if err != nil {
		return "", fmt.Errorf("destination %q: %w", dest, err)
	}
	return net.JoinHostPort(host, strconv.Itoa(HBONEPort)), nil
}
