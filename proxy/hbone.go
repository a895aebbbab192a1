//lint:file-ignore SA1019 the issue mandates golang.org/x/net/http2: net/http has no ServeConn or NewClientConn over a TLS connection we handshake (and count) ourselves

package proxy

// HBONE: app connections carried as HTTP/2 CONNECT streams over one mesh
// mTLS connection per peer pair, as Istio's ztunnel does, so a new app
// connection costs a stream, not a handshake.
//
// Inbound (WithHBONE, :15008): TLS 1.3 mesh mTLS with ALPN "h2", then an
// HTTP/2 server; each CONNECT stream is one app connection whose
// :authority is the original destination. HBONE must not become an open
// relay, so the authority is only accepted when it names this workload:
//
//   - an explicit inbound listener (WithInboundExplicit) by its bound
//     address (with an unspecified bind address: the IP the HBONE
//     connection arrived on) or by its app address written exactly; the
//     stream goes to that listener's app and policy is evaluated for the
//     app's port, as on the listener itself;
//   - with the transparent inbound listener (WithInboundTransparent): the
//     IP the HBONE connection arrived on (the pod IP, since clients send
//     CONNECT to DEST_IP:15008) and any port except Istio's reserved
//     15000-15099 and this proxy's own listener ports; loopback and
//     unspecified addresses never. The stream goes to that address and
//     policy is evaluated for its port, as on :15006.
//
// Anything else is refused with 403 (decision bad_destination). Each
// accepted stream then passes the same AuthorizationPolicy check as a mesh
// mTLS connection on :15006 (Proxy.authorize: same policy_denials_total
// reasons, log line and connections_total decision), with the peer's
// SPIFFE ID from the HBONE connection. HBONE is mesh mTLS, so STRICT and
// PERMISSIVE accept it; DISABLE accepts it too, as ztunnel does: DISABLE
// means mTLS is not required, not that it is refused, and unlike an
// opaque TLS stream on :15006 the tunnel is terminated here, so the app
// gets plaintext either way. Denied: 403; app unreachable: 503.
//
// Outbound (WithHBONEOutbound): where a connection gets mesh mTLS, it is
// sent as a CONNECT stream instead, to the peer's HBONE listener: the
// destination IP's port 15008 (transparent, as ztunnel assumes), DEST's
// host:15008 (explicit), or the address WithHBONEPeer names for DEST.
// One pooled HTTP/2 connection is kept per (HBONE address, SNI, expected
// server identity), verified exactly as the direct mTLS path verifies a
// server; a connection past the server's SETTINGS_MAX_CONCURRENT_STREAMS
// opens another, dead ones are dropped and redialed, idle ones closed
// after the pool idle timeout. There is no fallback, neither to
// plaintext nor to direct mTLS: if the peer's HBONE listener cannot be
// reached or refuses the stream, the app connection is refused.
//
// Half-close: the client may end its direction first (END_STREAM) and the
// server's reply keeps flowing. The HTTP/2 libraries cannot end the
// server's direction alone, so when the app half-closes first the stream
// is finished: the client sees the end of the reply, and data it sends
// after that is discarded.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/meshproxy/meshproxy/internal/ports"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// HBONEPort is the port of a peer's HBONE listener (docs/CONTRACT.md: 15008).
const HBONEPort = ports.HBONE

// ModeHBONE is the mode label and PeerInfo.Mode of app connections carried
// over HBONE (HTTP/2 CONNECT over mesh mTLS).
const ModeHBONE = "hbone"

// Decisions of HBONE streams, besides the common ones.
const (
	DecisionBadRequest     = "bad_request"     // not a CONNECT, or a malformed :authority
	DecisionBadDestination = "bad_destination" // :authority is not an address of this workload
	DecisionPeerRefused    = "peer_refused"    // outbound: the peer's HBONE listener answered the CONNECT with an error
)

// Defaults of HBONE.
const (
	DefaultHBONEMaxStreams = 100              // streams one inbound HBONE connection carries at once
	DefaultHBONEPoolIdle   = 90 * time.Second // an outbound pooled connection with no streams is closed after this
	// hboneServerIdle is longer than the pool's idle timeout so the
	// client, which knows when it stops using a connection, closes first.
	hboneServerIdle = 10 * time.Minute
	hboneALPN       = "h2"
)

// reservedPorts are Istio's own ports (15000-15099), never an HBONE target
// of the transparent inbound path.
func reservedPort(port uint16) bool { return port >= 15000 && port <= 15099 }

type hboneOptions struct {
	outbound   bool
	peers      map[string]string // destination → its HBONE listener
	maxStreams uint32
	poolIdle   time.Duration
}

func defaultHBONEOptions() hboneOptions {
	return hboneOptions{maxStreams: DefaultHBONEMaxStreams, poolIdle: DefaultHBONEPoolIdle}
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

// WithHBONEOutbound makes outbound connections that get mesh mTLS travel as
// HBONE streams over pooled connections to the peer's HBONE listener
// (port 15008 of the destination, unless WithHBONEPeer says otherwise).
func WithHBONEOutbound(on bool) Option {
	return func(o *options) { o.hbone.outbound = on }
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

// hbone is a Proxy's HBONE state: the inbound HTTP/2 server and the
// outbound connection pool.
type hbone struct {
	serverTLS *tls.Config
	h2s       *http2.Server
	// hs exists only so Shutdown can ask every served HTTP/2 connection
	// for a graceful GOAWAY (http2.ConfigureServer registers that hook).
	hs   *http.Server
	pool *hbonePool
}

func newHBONE(src tlsmgr.Source, pol mesh.PolicySource, o options) *hbone {
	cfg := mesh.ServerConfig(src, pol)
	cfg.NextProtos = []string{hboneALPN}
	h := &hbone{
		serverTLS: cfg,
		h2s: &http2.Server{
			MaxConcurrentStreams: o.hbone.maxStreams,
			IdleTimeout:          hboneServerIdle,
		},
		hs: &http.Server{ReadHeaderTimeout: o.HandshakeTimeout},
	}
	// Only fails for a TLS config with bad cipher suites; hs has none.
	_ = http2.ConfigureServer(h.hs, h.h2s)
	h.pool = newHBONEPool(o.hbone.poolIdle)
	return h
}

// shutdown asks every inbound HBONE connection to finish (GOAWAY: open
// streams complete, no new ones) and returns at once.
func (h *hbone) shutdown() {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // hs has no connections of its own to wait for
	_ = h.hs.Shutdown(ctx)
}

// serveHBONE runs the mesh mTLS handshake on an accepted HBONE connection
// and serves its CONNECT streams until it closes.
func (p *Proxy) serveHBONE(l *listener, t *conntrack.Conn, c net.Conn) {
	start := time.Now()
	tc := tls.Server(c, p.hbone.serverTLS)
	ctx, cancel := context.WithTimeout(t.Context(), p.opts.HandshakeTimeout)
	err := tc.HandshakeContext(ctx)
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
	local := mesh.AddrPort(c.LocalAddr()).Addr()
	p.log.Debug("hbone connection open", "source", t.Source, "peer", peer.String())
	p.hbone.h2s.ServeConn(tc, &http2.ServeConnOpts{
		Context:    t.Context(),
		BaseConfig: p.hbone.hs,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p.serveHBONEStream(l, tc, local, peer, w, r)
		}),
	})
	p.log.Debug("hbone connection closed", "source", t.Source, "peer", peer.String())
}

// serveHBONEStream tracks one CONNECT stream as a connection of its own
// (limits, /peers, drain) and answers it.
func (p *Proxy) serveHBONEStream(l *listener, tc *tls.Conn, local netip.Addr, peer spiffeid.ID, w http.ResponseWriter, r *http.Request) {
	sc := newHBONEServerStream(w, r, tc)
	finished := make(chan struct{})
	err := p.conns.Admit(p.base, mesh.DirInbound, sc, metrics.ConnectionsActive.WithLabelValues(mesh.DirInbound), func(t *conntrack.Conn) {
		defer close(finished)
		p.handleHBONEStream(l, t, sc, local, peer, r)
	})
	if err != nil {
		if errors.Is(err, conntrack.ErrOverLimit) {
			metrics.Connections.WithLabelValues(mesh.DirInbound, ModeHBONE, DecisionOverLimit).Inc()
			p.refusals.Warn(DecisionOverLimit, "connection refused", "direction", mesh.DirInbound, "listener", l.name, "source", sc.RemoteAddr().String(),
				"mode", ModeHBONE, "peer", peer.String(), "reason", DecisionOverLimit, "max_connections", p.opts.MaxConns)
		}
		sc.finish(http.StatusServiceUnavailable)
		return
	}
	select {
	case <-finished:
	case <-sc.writeDone:
		// The app ended its direction: END_STREAM now (see the notes above);
		// the copy loop winds down on its own.
	}
	sc.finish(0)
}

// handleHBONEStream checks a CONNECT stream's destination and the policy,
// then connects it to the app.
func (p *Proxy) handleHBONEStream(l *listener, t *conntrack.Conn, sc *hboneServerStream, local netip.Addr, peer spiffeid.ID, r *http.Request) {
	if r.Method != http.MethodConnect {
		sc.setFailStatus(http.StatusMethodNotAllowed)
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionBadRequest, dest: r.Host, peer: peer,
			err: fmt.Errorf("method %q, want CONNECT", r.Method)})
		return
	}
	dest, port, err := p.hboneTarget(r.Host, local)
	if err != nil {
		decision, status := DecisionBadDestination, http.StatusForbidden
		if errors.Is(err, errBadAuthority) {
			decision, status = DecisionBadRequest, http.StatusBadRequest
		}
		sc.setFailStatus(status)
		p.refuse(t, refusal{mode: ModeHBONE, decision: decision, dest: r.Host, peer: peer, err: err})
		return
	}
	sc.setFailStatus(http.StatusForbidden)
	if !p.authorize(t, p.pol.Current(), dest, port, ModeHBONE, peer, "") {
		return
	}
	sc.setFailStatus(http.StatusServiceUnavailable)
	up, err := p.dial(t, dest)
	if err != nil {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: peer, err: err})
		return
	}
	if err := sc.accept(); err != nil {
		p.log.Debug("hbone stream gone before it was answered", "source", t.Source, "destination", dest, "err", err)
		return
	}
	p.pipe(t, sc, up, dest, ModeHBONE, peer)
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
