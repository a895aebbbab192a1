package proxy

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/meshproxy/meshproxy/internal/localtcp"
	"github.com/meshproxy/meshproxy/internal/ratelog"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	fwd "github.com/meshproxy/meshproxy/proxy/forward"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Connection decisions (the decision label): DecisionAllow or why a
// connection was refused. Policy denials use policy.Decision.Reason.
const (
	DecisionAllow           = "allow"
	DecisionOverLimit       = "over_limit"           // --max-connections reached
	DecisionMTLSRequired    = "mtls_required"        // STRICT port, client not mesh mTLS
	DecisionHandshakeFailed = "handshake_failed"     // sniff or mesh TLS handshake failed (see handshakes_total)
	DecisionNoOriginalDst   = "no_original_dst"      // original destination unknown
	DecisionLoop            = "loop"                 // destination is loopback or this listener
	DecisionUnreachable     = "upstream_unreachable" // dialing the app or destination failed
	DecisionNoIdentity      = "no_identity"          // no SVID loaded to originate mTLS
	// DecisionDestinationRuleRejected: the DestinationRule covering the
	// destination asked for TLS origination and was rejected; sending the
	// connection in plaintext instead would expose it.
	DecisionDestinationRuleRejected = "destination_rule_rejected"
)

type listenerKind int

const (
	inboundTransparent listenerKind = iota
	outboundTransparent
	inboundExplicit
	outboundExplicit
	inboundHBONE
)

func (k listenerKind) String() string {
	return [...]string{"inbound", "outbound", "inbound-explicit", "outbound-explicit", "inbound-hbone"}[k]
}

func (k listenerKind) direction() string {
	if k == inboundTransparent || k == inboundExplicit || k == inboundHBONE {
		return mesh.DirInbound
	}
	return mesh.DirOutbound
}

type listener struct {
	spec listenerSpec
	name string
	ln   net.Listener
	port uint16 // bound port
	// inbound explicit: the app's port, for policy
	appPort uint16
	// outbound explicit: SNI to send, if the destination is a host name
	sni string
}

// Proxy is the sidecar data plane. Create it with New, bind with Start,
// stop with Shutdown.
type Proxy struct {
	src       tlsmgr.Source
	pol       mesh.PolicySource
	opts      options
	log       *slog.Logger
	refusals  *ratelog.Limiter // refusal lines, sampled per reason
	serverTLS *tls.Config
	clientTLS *mesh.ClientConfigs
	hbone     *hbone
	base      context.Context
	appDialer mesh.Dialer // the Dialer, without TCP keepalive (see localSockets)

	conns *conntrack.Table

	mu        sync.Mutex
	started   bool
	closing   bool
	listeners []*listener

	inboundFallback sync.Once // logs the first inbound dial that cannot use the client's address
	pools           poolLimits
}

// New returns a Proxy serving src's identity under pol's policy. Nothing is
// bound until Start.
func New(src tlsmgr.Source, pol mesh.PolicySource, opts ...Option) *Proxy {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	log := o.Log.With("component", "proxy")
	serverTLS := mesh.ServerConfig(src, pol)
	applyKeyExchange(serverTLS, o.keyExchange)
	if o.hbone.mode != HBONENever {
		// Server preference: a client offering it gets a pooled connection.
		serverTLS.NextProtos = append([]string{hb.ALPN}, serverTLS.NextProtos...)
	}
	clientTLS := mesh.NewClientConfigs(src)
	clientTLS.UseKeyExchange(o.keyExchange)
	return &Proxy{
		src:       src,
		pol:       pol,
		opts:      o,
		log:       log,
		refusals:  ratelog.New(log, 0),
		serverTLS: serverTLS,
		clientTLS: clientTLS,
		hbone:     newHBONE(src, pol, o),
		appDialer: localDialer(o.Dialer),
		conns:     conntrack.NewTable(log, o.MaxConns),
	}
}

// Sockets between the proxy and the apps of its own workload (accepted by
// the outbound listeners, dialed to the app) get no TCP keepalive unless
// the ListenConfig or Dialer asks for one: the peer is on this host, where
// a dead socket is reported, not silent, and the four setsockopt calls the
// net package makes for Go's default keepalive are a measurable share of a
// new app connection's cost. Nor do they pace: where the host's congestion
// control is BBR they get Reno (see internal/localtcp).

// localDialer is d for the apps of this workload: without the default TCP
// keepalive unless d configures one, and unpaced, if d is a net.Dialer.
func localDialer(d mesh.Dialer) mesh.Dialer {
	nd, ok := d.(*net.Dialer)
	if !ok {
		return d
	}
	local := *nd
	if nd.KeepAlive == 0 && !nd.KeepAliveConfig.Enable {
		local.KeepAlive = -1
	}
	if cc := nd.ControlContext; cc != nil { // the net package calls it instead of Control
		local.ControlContext = func(ctx context.Context, network, address string, c syscall.RawConn) error {
			if err := cc(ctx, network, address, c); err != nil {
				return err
			}
			return localtcp.Control(network, address, c)
		}
	} else {
		local.Control = localtcp.Chain(nd.Control)
	}
	return &local
}

// applyKeyExchange sets cfg's key exchange to kx's (none: the default),
// and full-size records from the first byte (see mesh.ClientConfigs).
func applyKeyExchange(cfg *tls.Config, kx mesh.KeyExchange) {
	cfg.CurvePreferences = kx.Curves()
	cfg.DynamicRecordSizingDisabled = true
}

// Start binds every listener and serves in the background until Shutdown.
// On failure nothing is left bound and the error names the listener. ctx
// is used for binding and as the parent of connection contexts for its
// values only: cancelling it does not stop the proxy; Shutdown does.
func (p *Proxy) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.started || p.closing {
		return errors.New("proxy already started")
	}
	if len(p.opts.listeners) == 0 {
		return errors.New("no listeners configured")
	}
	var ls []*listener
	closeAll := func() {
		for _, l := range ls {
			l.ln.Close()
		}
	}
	for _, spec := range p.opts.listeners {
		l, err := p.bind(ctx, spec)
		if err != nil {
			closeAll()
			return err
		}
		ls = append(ls, l)
	}
	p.base = context.WithoutCancel(ctx)
	p.listeners = ls
	p.started = true
	for _, l := range ls {
		p.conns.Serve(l.ln, func(c net.Conn) { p.admit(l, c) }, "listener", l.name)
		p.log.Info("listening", "listener", l.name, "addr", l.ln.Addr().String())
	}
	return nil
}

func (p *Proxy) bind(ctx context.Context, spec listenerSpec) (*listener, error) {
	l := &listener{spec: spec, name: spec.kind.String() + " " + spec.listen}
	if spec.target != "" {
		l.name += "=" + spec.target
	}
	switch spec.kind {
	case inboundTransparent, outboundTransparent:
		if p.opts.originalDst == nil {
			return nil, fmt.Errorf("listener %s: transparent capture needs an original-destination lookup", l.name)
		}
	case inboundExplicit:
		_, port, err := splitHostPort(spec.target)
		if err != nil {
			return nil, fmt.Errorf("listener %s: app address: %w", l.name, err)
		}
		l.appPort = port
	case outboundExplicit:
		host, port, err := splitHostPort(spec.target)
		if err != nil {
			return nil, fmt.Errorf("listener %s: destination: %w", l.name, err)
		}
		if _, err := netip.ParseAddr(host); err != nil && host != "" {
			l.sni = tlsmgr.OutboundSNI(host, port)
		}
	}
	lc := p.opts.ListenConfig
	if spec.kind.direction() == mesh.DirOutbound { // apps of this workload (see localDialer)
		if lc.KeepAlive == 0 && !lc.KeepAliveConfig.Enable {
			lc.KeepAlive = -1
		}
		lc.Control = localtcp.Chain(lc.Control)
	}
	listen := lc.Listen
	if spec.kind == inboundTransparent && p.opts.inboundListen != nil {
		listen = p.opts.inboundListen
	}
	ln, err := listen(ctx, "tcp", spec.listen)
	if err != nil {
		return nil, fmt.Errorf("listener %s: %w", l.name, err)
	}
	l.ln = ln
	if ap, err := netip.ParseAddrPort(ln.Addr().String()); err == nil {
		l.port = ap.Port()
	}
	return l, nil
}

// splitHostPort parses host:port with a non-zero numeric port.
func splitHostPort(addr string) (string, uint16, error) {
	host, ps, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("%q: %w", addr, err)
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil || port == 0 {
		return "", 0, fmt.Errorf("%q: port must be 1-65535", addr)
	}
	return host, uint16(port), nil
}

// admit starts handling c, or closes it at once when over the limit or
// shutting down.
func (p *Proxy) admit(l *listener, c net.Conn) {
	dir := l.spec.kind.direction()
	err := p.conns.Admit(p.base, dir, c, metrics.ConnectionsActive.WithLabelValues(dir), func(t *conntrack.Conn) {
		if l.spec.kind == inboundHBONE {
			p.serveHBONE(l, t, c)
		} else if dir == mesh.DirInbound {
			p.handleInbound(l, t, c)
		} else {
			p.handleOutbound(l, t, c)
		}
	})
	if errors.Is(err, conntrack.ErrOverLimit) {
		metrics.Connections.WithLabelValues(dir, mesh.ModeUnknown, DecisionOverLimit).Inc()
		p.refusals.Warn(DecisionOverLimit, "connection refused", "direction", dir, "listener", l.name,
			"source", c.RemoteAddr().String(), "reason", DecisionOverLimit, "max_connections", p.opts.MaxConns)
	}
	if err != nil {
		c.Close()
	}
}

// Shutdown stops accepting, lets open connections finish until ctx is done,
// then closes the rest and returns ctx's error. It returns once every
// connection goroutine has exited.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closing = true
	p.conns.Close()
	ls := p.listeners
	p.mu.Unlock()
	for _, l := range ls {
		l.ln.Close()
	}
	p.hbone.shutdown()
	defer p.hbone.pool.close()
	return p.conns.Drain(ctx)
}

// Ready returns nil when every listener is bound, the identity source is
// ready and so is the policy source, if it can say (a Ready() error method:
// the sidecar's policy for the SVID's namespace); otherwise why not.
func (p *Proxy) Ready() error {
	p.mu.Lock()
	started, closing := p.started, p.closing
	p.mu.Unlock()
	switch {
	case closing:
		return errors.New("proxy is shutting down")
	case !started:
		return errors.New("listeners not bound yet")
	}
	if err := p.src.Ready(); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	if r, ok := p.pol.(interface{ Ready() error }); ok {
		if err := r.Ready(); err != nil {
			return fmt.Errorf("policy: %w", err)
		}
	}
	return nil
}

// Addrs returns the bound address of every listener, in the order the
// listener options were given (nil before Start).
func (p *Proxy) Addrs() []net.Addr {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []net.Addr
	for _, l := range p.listeners {
		out = append(out, l.ln.Addr())
	}
	return out
}

// Peers lists the established connections.
func (p *Proxy) Peers() []conntrack.PeerInfo { return p.conns.Peers() }

// Config returns the effective configuration and policy.
func (p *Proxy) Config() (mesh.Config, error) {
	snap := p.pol.Current()
	pol, err := json.Marshal(snap)
	if err != nil {
		return mesh.Config{}, fmt.Errorf("marshal policy: %w", err)
	}
	cfg := mesh.Config{
		Generation: snap.Generation(),
		Mode:       snap.InboundMode(0).String(),
		MeshCIDRs:  []string{},
		Listeners:  []mesh.ListenerInfo{},
		Policy:     pol,
	}
	if td, err := p.trustDomain(); err == nil {
		cfg.TrustDomain = td.String()
	}
	for _, c := range p.opts.meshCIDRs {
		cfg.MeshCIDRs = append(cfg.MeshCIDRs, c.String())
	}
	p.mu.Lock()
	bound := make(map[int]string, len(p.listeners))
	for i, l := range p.listeners {
		bound[i] = l.ln.Addr().String()
	}
	p.mu.Unlock()
	for i, spec := range p.opts.listeners {
		li := mesh.ListenerInfo{Kind: spec.kind.String(), Listen: spec.listen, Address: bound[i], Target: spec.target}
		li.Name = li.Kind + " " + spec.listen
		if spec.target != "" {
			li.Name += "=" + spec.target
		}
		if !spec.id.IsZero() {
			li.ExpectedID = spec.id.String()
		}
		if spec.kind == inboundExplicit {
			if _, port, err := splitHostPort(spec.target); err == nil {
				li.Mode = snap.InboundMode(port).String()
			}
		}
		cfg.Listeners = append(cfg.Listeners, li)
	}
	return cfg, nil
}

// trustDomain is the configured trust domain, else that of the current SVID.
func (p *Proxy) trustDomain() (spiffeid.TrustDomain, error) {
	return mesh.TrustDomain(p.opts.TrustDomain, p.src)
}

// refusal describes why a connection is closed, for the metric and the log.
type refusal struct {
	mode     string
	decision string
	dest     string
	peer     spiffeid.ID
	policy   string
	err      error
}

// refuse counts and logs a refused connection; the caller's release closes it.
func (p *Proxy) refuse(t *conntrack.Conn, r refusal) {
	metrics.Connections.WithLabelValues(t.Direction, r.mode, r.decision).Inc()
	attrs := []any{"direction", t.Direction, "source", t.Source, "mode", r.mode, "reason", r.decision}
	if r.dest != "" {
		attrs = append(attrs, "destination", r.dest)
	}
	if !r.peer.IsZero() {
		attrs = append(attrs, "peer", r.peer.String())
	}
	if r.policy != "" {
		attrs = append(attrs, "policy", r.policy)
	}
	if r.err != nil {
		attrs = append(attrs, "err", r.err.Error())
	}
	p.refusals.Warn(r.decision, "connection refused", attrs...)
	t.Abort()
}

// dial opens an upstream connection for t and registers it for abort.
func (p *Proxy) dial(t *conntrack.Conn, addr string) (net.Conn, error) {
	return p.dialWith(t, addr, p.opts.Dialer.DialContext)
}

// dialApp connects an inbound connection to the app. Behind the transparent
// inbound listener with an inbound dialer (TPROXY), the connection is made
// on behalf of the client, from its address; otherwise it is a plain dial.
func (p *Proxy) dialApp(l *listener, t *conntrack.Conn, addr string) (net.Conn, error) {
	fn := p.opts.inboundDialer
	if l.spec.kind != inboundTransparent || fn == nil {
		return p.dialWith(t, addr, p.appDialer.DialContext)
	}
	client, err := netip.ParseAddrPort(t.Source)
	client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
	if err != nil || client.Addr().IsLoopback() || client.Addr().IsUnspecified() {
		// Replies to such an address could not be steered back to us.
		p.inboundFallback.Do(func() {
			p.log.Info("inbound: client address is loopback or unknown, connecting to the app from the proxy's own address (logged once)",
				"source", t.Source, "destination", addr)
		})
		return p.dialWith(t, addr, p.appDialer.DialContext)
	}
	return p.dialWith(t, addr, func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := fn(ctx, client, network, addr)
		if err != nil {
			return nil, fmt.Errorf("from %s: %w", client.Addr(), err)
		}
		return c, nil
	})
}

// dialWith opens an upstream connection for t with dial and registers it
// for abort.
func (p *Proxy) dialWith(t *conntrack.Conn, addr string, dial conntrack.DialFunc) (net.Conn, error) {
	return t.Dial(dial, addr, mesh.DefaultDialTimeout)
}

// pipe counts an allowed connection, forwards it and logs its end.
func (p *Proxy) pipe(t *conntrack.Conn, down, up net.Conn, dest, mode string, peer spiffeid.ID) {
	var peerID string
	if !peer.IsZero() {
		peerID = peer.String()
	}
	metrics.Connections.WithLabelValues(t.Direction, mode, DecisionAllow).Inc()
	if mode == mesh.ModeMTLS {
		direct := metrics.MeshConnections.WithLabelValues(t.Direction, TransportDirect)
		direct.Inc()
		defer direct.Dec()
	}
	t.Establish(dest, mode, peerID)
	p.log.Debug("connection open", "direction", t.Direction, "source", t.Source, "destination", dest, "mode", mode, "peer", peerID)
	err := fwd.Forward(down, up, &t.Stats, p.opts.IdleTimeout, t.Abort, metrics.Bytes.WithLabelValues(t.Direction))
	attrs := []any{"direction", t.Direction, "source", t.Source, "destination", dest, "mode", mode,
		"peer", peerID, "bytes_in", t.Stats.In.Load(), "bytes_out", t.Stats.Out.Load(),
		"duration", time.Since(t.Since).Round(time.Millisecond).String()}
	switch {
	case errors.Is(err, fwd.ErrIdle):
		p.log.Info("connection closed: idle timeout", attrs...)
	case err != nil:
		p.log.Debug("connection aborted", append(attrs, "err", err.Error())...)
	default:
		p.log.Debug("connection closed", attrs...)
	}
}

// isSelf reports whether dst is the listener's own socket: a connection made
// straight to the capture port, which would loop forever if forwarded.
func isSelf(l *listener, c net.Conn, dst netip.AddrPort) bool {
	local := mesh.AddrPort(c.LocalAddr())
	return dst.Port() == l.port && dst.Addr().Unmap() == local.Addr().Unmap()
}

// gatheringTLS is a mesh TLS connection over a CorkConn, whose reads gather
// what came together (ReadMore) and whose writes of more than one record
// are corked into one write to the socket: crypto/tls writes each record
// on its own, and on a host whose TCP paces (BBR) the size of the writes
// to the mesh socket sets a transfer's speed — per-connection bulk 1.12x
// with the copy loop's 512 KiB writes corked, where corking its 128 KiB
// ones had cost more than it saved (see forward.bulkBufSize). A write of
// up to one record is one system call either way.
type gatheringTLS struct {
	*tls.Conn
	cork *hb.CorkConn
}

// ReadMore reads only what needs no wait for the socket (see
// hbone.CorkConn.ReadNow): the copy loop gathers the records that came
// together into one write to the app (forward.RecordReader).
func (c gatheringTLS) ReadMore(p []byte) (int, error) { return c.cork.ReadNow(c.Conn, p) }

// Write writes p on the TLS connection, its records in one write to the
// socket when they are several (hbone.CorkConn.Gather).
func (c gatheringTLS) Write(p []byte) (n int, err error) {
	err = c.cork.Gather(len(p), func() error {
		n, err = c.Conn.Write(p)
		return err
	})
	return n, err
}
