package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxPoolAttempts bounds how often one app connection looks for a pooled
// connection (waiting for a dial in progress, or redialing a dead one).
const maxPoolAttempts = 8

// Bounds of one pooled connection's life. A pooled connection pins every
// stream of its key to the endpoint the kernel picked when it was made (a
// Service VIP is DNATed to one pod per TCP connection), so it stops taking
// new streams after hbonePoolMaxAge or hbonePoolMaxStreams, whichever
// comes first, and the next app connection makes a new one: app
// connections spread over the endpoints as kube-proxy picks one for each
// new connection. Streams already open finish (GOAWAY). The age bounds a
// quiet client's pinning; the count a busy one's. Cost: in
// BenchmarkDirectNewConnection an app connection with its own handshake
// takes 1.52 ms against 0.46 ms as a stream (BenchmarkHBONENewConnection),
// so one handshake per 1000 streams adds ~1 µs a stream (0.2%); at 2000
// app connections/s a Service's endpoints are picked again every 0.5 s.
// App connections arriving while the successor is dialed ride the retired
// connection rather than wait for its handshake.
const (
	hbonePoolMaxAge     = 30 * time.Second
	hbonePoolMaxStreams = 1000
)

// hboneConn is one pooled outbound mesh mTLS connection speaking HBONE.
type hboneConn struct {
	c      *hb.Conn
	peer   spiffeid.ID
	local  net.Addr
	remote net.Addr
	born   time.Time

	// Guarded by hbonePool.mu.
	streams int  // streams handed out by the pool (stream 1 included)
	retired bool // past its bounds: no new streams once a successor is dialed
}

func newHBONEConn(c *hb.Conn, peer spiffeid.ID, local, remote net.Addr) *hboneConn {
	return &hboneConn{c: c, peer: peer, local: local, remote: remote, born: time.Now(), streams: 1}
}

// hboneDial is a dial in progress that other app connections for the same
// key wait for instead of dialing too.
type hboneDial struct {
	done chan struct{}
	err  error
}

// hbonePool keeps the outbound HBONE connections by key (where to, and
// which server identity was verified), several per key once one is full.
type hbonePool struct {
	opts       hb.Options
	log        *slog.Logger
	maxAge     time.Duration // a connection's bounds (hbonePoolMaxAge, hbonePoolMaxStreams)
	maxStreams int

	mu     sync.Mutex
	conns  map[string][]*hboneConn
	dials  map[string]*hboneDial
	cfgs   map[string]*tls.Config
	direct map[string]time.Time // auto mode: keys whose last dial did not pool, and when
	// auto mode: keys whose peer refused a pooled stream's destination (a
	// meshproxy server without aliases), and until when they stay
	// per-connection without offering HBONE
	refused map[string]time.Time
	closed  bool
}

// refusedMemory is how long a key whose peer refused a pooled stream's
// destination stays per-connection mTLS: such a server refuses every
// captured Service destination, and is replaced by a rolling update in
// minutes.
const refusedMemory = 5 * time.Minute

// directMemory is how long auto mode remembers that a destination's last
// dial did not become a pooled connection (a peer that does not speak
// HBONE, or a failed dial), so connections to it dial at once instead of
// queueing behind each other's handshakes.
const directMemory = 30 * time.Second

func newHBONEPool(opts hb.Options, log *slog.Logger, maxAge time.Duration, maxStreams int) *hbonePool {
	return &hbonePool{
		opts:       opts,
		log:        log,
		maxAge:     maxAge,
		maxStreams: maxStreams,
		conns:      make(map[string][]*hboneConn),
		dials:      make(map[string]*hboneDial),
		cfgs:       make(map[string]*tls.Config),
		direct:     make(map[string]time.Time),
		refused:    make(map[string]time.Time),
	}
}

// refusedRecently reports whether key's peer refused a pooled stream's
// destination less than refusedMemory ago.
func (pl *hbonePool) refusedRecently(key string) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	until, ok := pl.refused[key]
	if ok && time.Now().After(until) {
		delete(pl.refused, key)
		return false
	}
	return ok
}

// refuse remembers that key's peer refused a pooled stream's destination,
// and retires key's pooled connections (their open streams finish). first
// reports that key was not remembered already.
func (pl *hbonePool) refuse(key string) (first bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	_, known := pl.refused[key]
	if !known && len(pl.refused) >= mesh.MaxClientConfigs {
		clear(pl.refused)
	}
	pl.refused[key] = time.Now().Add(refusedMemory)
	for _, c := range pl.conns[key] {
		c.retired = true
	}
	pl.retireLocked(key)
	return !known
}

// retireLocked sends GOAWAY on key's retired connections and forgets them:
// open streams finish, then they close. Called with mu held.
func (pl *hbonePool) retireLocked(key string) {
	live := pl.conns[key][:0]
	for _, c := range pl.conns[key] {
		if c.retired {
			c.c.Shutdown()
			continue
		}
		live = append(live, c)
	}
	clear(pl.conns[key][len(live):])
	if len(live) == 0 {
		delete(pl.conns, key)
	} else {
		pl.conns[key] = live
	}
}

// joinDial is auto mode's way to a pooled connection for key when none
// has room: if another app connection is dialing one (and key is not
// known to stay direct), it returns a channel closed when that dial is
// done; otherwise it registers the caller's own dial and returns finish,
// to be called as soon as the handshake is over, with whether it pooled.
func (pl *hbonePool) joinDial(key string) (wait <-chan struct{}, finish func(pooled bool)) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if at, ok := pl.direct[key]; ok && time.Since(at) < directMemory {
		return nil, func(bool) {}
	}
	if d, ok := pl.dials[key]; ok {
		return d.done, nil
	}
	d := &hboneDial{done: make(chan struct{})}
	pl.dials[key] = d
	return nil, func(pooled bool) {
		pl.mu.Lock()
		defer pl.mu.Unlock()
		if pl.dials[key] == d {
			delete(pl.dials, key)
		}
		// Connections past their bounds carried streams while this dial
		// ran; now new streams go to its connection, or direct.
		pl.retireLocked(key)
		if pooled {
			delete(pl.direct, key)
		} else {
			if len(pl.direct) >= mesh.MaxClientConfigs {
				clear(pl.direct)
			}
			pl.direct[key] = time.Now()
		}
		close(d.done)
	}
}

var errPoolClosed = errors.New("hbone pool closed")

// dialing reports whether a connection for key is being dialed.
func (pl *hbonePool) dialing(key string) bool {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	_, ok := pl.dials[key]
	return ok
}

// pick returns the pooled connection for key with the most room for a
// stream, or nil, and counts the stream. Closed connections are dropped;
// full ones and retired ones (past their bounds, see hbonePoolMaxAge) are
// skipped. With retired, it picks among the retired ones instead: they
// carry streams while their successor is dialed. Called with mu held.
func (pl *hbonePool) pick(key string, retired bool) *hboneConn {
	var best *hboneConn
	room := 0
	live := pl.conns[key][:0]
	for _, c := range pl.conns[key] {
		select {
		case <-c.c.Done():
			continue
		default:
		}
		live = append(live, c)
		if !c.retired && (pl.maxAge > 0 && time.Since(c.born) >= pl.maxAge || pl.maxStreams > 0 && c.streams >= pl.maxStreams) {
			c.retired = true
		}
		if c.retired != retired {
			continue
		}
		if n := c.c.Available(); n > room {
			best, room = c, n
		}
	}
	clear(pl.conns[key][len(live):])
	if len(live) == 0 {
		delete(pl.conns, key)
	} else {
		pl.conns[key] = live
	}
	if best != nil {
		best.streams++
	}
	return best
}

// lookup returns a pooled connection for key with room for a stream, or
// nil; with retired, one past its bounds (see pick).
func (pl *hbonePool) lookup(key string, retired bool) *hboneConn {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.closed {
		return nil
	}
	return pl.pick(key, retired)
}

// add pools c under key, counted in the pooled gauge until it closes.
func (pl *hbonePool) add(key string, c *hboneConn) error {
	pl.mu.Lock()
	if pl.closed {
		pl.mu.Unlock()
		c.c.Close()
		return errPoolClosed
	}
	pl.conns[key] = append(pl.conns[key], c)
	pl.retireLocked(key) // c succeeds them
	pl.mu.Unlock()
	gauge := metrics.MeshConnections.WithLabelValues(mesh.DirOutbound, TransportPooled)
	gauge.Inc()
	go func() {
		<-c.c.Done()
		gauge.Dec()
		if err := c.c.Err(); err != nil {
			pl.log.Warn("pooled hbone connection failed", "peer", c.peer.String(), "remote", c.remote.String(), "err", err.Error())
		}
	}()
	return nil
}

// get returns a pooled connection for key with room for a stream, dialing
// one (once, however many callers wait) if none has room.
func (pl *hbonePool) get(ctx context.Context, key string, dial func() (*hboneConn, error)) (*hboneConn, error) {
	for range maxPoolAttempts {
		pl.mu.Lock()
		if pl.closed {
			pl.mu.Unlock()
			return nil, errPoolClosed
		}
		if c := pl.pick(key, false); c != nil {
			pl.mu.Unlock()
			return c, nil
		}
		if d, ok := pl.dials[key]; ok {
			pl.mu.Unlock()
			select {
			case <-d.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if d.err != nil {
				return nil, d.err
			}
			continue
		}
		d := &hboneDial{done: make(chan struct{})}
		pl.dials[key] = d
		pl.mu.Unlock()

		c, err := dial()
		pl.mu.Lock()
		delete(pl.dials, key)
		d.err = err
		close(d.done)
		pl.mu.Unlock()
		if err != nil {
			return nil, err
		}
		if err := pl.add(key, c); err != nil {
			return nil, err
		}
		// Others may have taken its streams meanwhile: look again.
	}
	return nil, fmt.Errorf("no hbone connection with a free stream after %d attempts", maxPoolAttempts)
}

// size is the number of open pooled connections, for tests.
func (pl *hbonePool) size() int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	n := 0
	for _, cs := range pl.conns {
		for _, c := range cs {
			select {
			case <-c.c.Done():
			default:
				n++
			}
		}
	}
	return n
}

// close closes every pooled connection and refuses new ones.
func (pl *hbonePool) close() {
	pl.mu.Lock()
	pl.closed = true
	all := pl.conns
	pl.conns = make(map[string][]*hboneConn)
	pl.mu.Unlock()
	for _, cs := range all {
		for _, c := range cs {
			c.c.Close()
		}
	}
}

// clientConfig is a variant of the direct path's client config for the
// same SNI and expected identities with other ALPN protocols: h2 for a
// peer's HBONE listener, or the negotiation offer.
func (pl *hbonePool) clientConfig(base *mesh.ClientConfigs, sni string, ids []spiffeid.ID, td spiffeid.TrustDomain, alpn ...string) *tls.Config {
	key := sni + "|" + mesh.JoinIDs(ids) + "|" + td.String() + "|" + fmt.Sprint(alpn)
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if cfg, ok := pl.cfgs[key]; ok {
		return cfg
	}
	cfg := base.Get(sni, ids, td).Clone()
	cfg.NextProtos = alpn
	if len(pl.cfgs) >= mesh.MaxClientConfigs {
		clear(pl.cfgs)
	}
	pl.cfgs[key] = cfg
	return cfg
}

// hboneKey names the pooled connections that may carry a stream to dest:
// same address, SNI and verified server identity, made under the current
// identity generation (our SVID and trust bundles: after a rotation or a
// trust change new streams go to a connection handshaken under it, and the
// old ones idle out). With ruleSANs the expected ids are read from the
// DestinationRules when a connection is made, so the key carries the
// policy generation: a connection verified under rules no longer in force
// is not reused.
func (p *Proxy) hboneKey(addr, sni string, ids []spiffeid.ID, td spiffeid.TrustDomain, ruleSANs bool) string {
	key := addr + "|" + sni + "|" + mesh.JoinIDs(ids) + "|" + td.String() + fmt.Sprintf("|gen@%d", p.src.Generation())
	if ruleSANs {
		key += fmt.Sprintf("|rule@%d", p.pol.Current().Generation())
	}
	return key
}

// openStream opens a CONNECT stream for dest on hc. ok false with a nil
// error means the connection had no room after all (try another).
func (p *Proxy) openStream(t *conntrack.Conn, hc *hboneConn, dest string) (*hb.Stream, string, error) {
	authority := dest
	if _, err := netip.ParseAddrPort(dest); err != nil {
		// A host name: CONNECT to the address actually reached.
		_, destPort, _ := splitHostPort(dest)
		authority = netip.AddrPortFrom(mesh.AddrPort(hc.remote).Addr(), destPort).String()
	}
	s, err := hc.c.Open(t.Context(), authority)
	if err != nil {
		return nil, authority, fmt.Errorf("hbone CONNECT %s via %s: %w", authority, hc.remote, err)
	}
	return s, authority, nil
}

// retryable reports whether a stream failed before the peer processed it,
// so it may be opened again elsewhere (nothing was read from the app yet).
func retryable(err error) bool {
	return errors.Is(err, hb.ErrFull) || errors.Is(err, hb.ErrUnavailable) || errors.Is(err, hb.ErrRefused)
}

// pipeStream forwards down over an opened stream, or refuses it if the
// peer answered with an error.
func (p *Proxy) pipeStream(t *conntrack.Conn, down net.Conn, s *hb.Stream, hc *hboneConn, dest, authority string) {
	if s.Status() != http.StatusOK {
		s.Close()
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionPeerRefused, dest: dest, peer: hc.peer,
			err: fmt.Errorf("hbone peer %s answered CONNECT %s with %d %s", hc.remote, authority, s.Status(), http.StatusText(s.Status()))})
		return
	}
	if !t.AddSocket(s) {
		return
	}
	p.pipe(t, down, s, dest, ModeHBONE, hc.peer)
}

// originatePooled sends down as a stream on an existing pooled connection
// for key, if one has room (auto mode); done false if none did, and down
// is still untouched. fallback: the peer refused dest on its pooled
// connection (see originate), down is untouched.
func (p *Proxy) originatePooled(t *conntrack.Conn, down net.Conn, key, dest string) (done, fallback bool) {
	for range maxPoolAttempts {
		hc := p.hbone.pool.lookup(key, false)
		if hc == nil && p.hbone.pool.dialing(key) {
			// Ride a connection past its bounds while its successor is
			// dialed, rather than wait for the handshake.
			hc = p.hbone.pool.lookup(key, true)
		}
		if hc == nil {
			return false, false
		}
		s, authority, err := p.openStream(t, hc, dest)
		if err != nil {
			if retryable(err) && t.Context().Err() == nil {
				continue
			}
			p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, peer: hc.peer, err: err})
			return true, false
		}
		if refusedDestination(s) {
			s.Close()
			p.hboneFallback(key, dest, hc, s)
			return false, true
		}
		p.pipeStream(t, down, s, hc, dest, authority)
		return true, false
	}
	return false, false
}

// refusedDestination reports whether the peer refused s because it does
// not serve its destination on that connection: 403 with decision
// bad_destination, or with no decision at all (a meshproxy server older
// than aliases, whose inbound refuses a stream naming a Service VIP). A
// policy denial names its reason and is final.
func refusedDestination(s *hb.Stream) bool {
	if s.Status() != http.StatusForbidden {
		return false
	}
	r := s.FailReason()
	return r == "" || r == DecisionBadDestination
}

// hboneFallback remembers that key's peer refused dest's stream s on a
// pooled connection, so key goes per-connection for refusedMemory.
func (p *Proxy) hboneFallback(key, dest string, hc *hboneConn, s *hb.Stream) {
	if p.hbone.pool.refuse(key) {
		p.log.Info("hbone: peer refused a pooled stream's destination; per-connection mTLS to it for a while",
			"destination", dest, "peer", hc.peer.String(), "remote", hc.remote.String(),
			"status", s.Status(), "decision", s.FailReason(), "for", refusedMemory.String())
	}
}

// originateHBONE sends one outbound connection as a CONNECT stream for dest
// to the peer's HBONE listener (always mode), verifying the server as
// originate does: it must present one of ids, or, if ids is empty, be a
// member of our trust domain; with ruleSANs the ids come from the
// DestinationRule covering the address reached (checked when the pooled
// connection is made).
func (p *Proxy) originateHBONE(t *conntrack.Conn, down net.Conn, dest, sni string, ids []spiffeid.ID, ruleSANs bool) {
	addr, err := p.hbonePeerAddr(dest)
	if err != nil {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, err: err})
		return
	}
	td, tdErr := p.trustDomain()
	if tdErr != nil && len(ids) == 0 && !ruleSANs {
		p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionNoIdentity, dest: dest, err: tdErr})
		return
	}
	key := "listener|" + p.hboneKey(addr, sni, ids, td, ruleSANs)
	_, destPort, _ := splitHostPort(dest)
	dial := func() (*hboneConn, error) {
		return p.dialHBONE(addr, sni, ids, ruleSANs, destPort, td, tdErr)
	}
	// A pooled connection can go away between get and the stream (idle
	// close, GOAWAY, peer restart); nothing was read from the app yet, so
	// try another.
	var lastErr error
	for range maxPoolAttempts {
		hc, err := p.hbone.pool.get(t.Context(), key, dial)
		if err != nil {
			var he *mesh.HandshakeError
			decision := DecisionUnreachable
			if errors.As(err, &he) {
				decision = DecisionHandshakeFailed
			}
			if errors.Is(err, tlsmgr.ErrNoIdentity) {
				decision = DecisionNoIdentity
			}
			p.refuse(t, refusal{mode: ModeHBONE, decision: decision, dest: dest, err: err})
			return
		}
		s, authority, err := p.openStream(t, hc, dest)
		if err != nil {
			lastErr = err
			if retryable(err) && t.Context().Err() == nil {
				continue
			}
			break
		}
		p.pipeStream(t, down, s, hc, dest, authority)
		return
	}
	p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, err: lastErr})
}

// dialHBONE makes a new pooled connection to a peer's HBONE listener: TCP
// to addr, mesh mTLS with ALPN h2 (counted in handshakes_total like any
// outbound handshake), and HTTP/2 up to the server's first SETTINGS, so
// its stream limit is known.
func (p *Proxy) dialHBONE(addr, sni string, ids []spiffeid.ID, ruleSANs bool, destPort uint16, td spiffeid.TrustDomain, tdErr error) (*hboneConn, error) {
	// Not tied to one app connection: others wait for this dial and use it.
	ctx, cancel := context.WithTimeout(p.base, mesh.DefaultDialTimeout+p.opts.HandshakeTimeout)
	defer cancel()
	dctx, dcancel := context.WithTimeout(ctx, mesh.DefaultDialTimeout)
	raw, err := p.opts.Dialer.DialContext(dctx, "tcp", addr)
	dcancel()
	if err != nil {
		return nil, fmt.Errorf("dial hbone %s: %w", addr, err)
	}
	if ruleSANs {
		reached := netip.AddrPortFrom(mesh.AddrPort(raw.RemoteAddr()).Addr(), destPort)
		if rule := p.pol.Current().Outbound(reached); rule.Matched && rule.MTLS {
			ids = rule.SANs
		}
	}
	if len(ids) == 0 && tdErr != nil {
		raw.Close()
		return nil, tdErr
	}
	cork := hb.NewCorkConn(raw)
	tc, peer, err := mesh.Originate(ctx, cork, p.hbone.pool.clientConfig(p.clientTLS, sni, ids, td, hboneALPN), p.opts.HandshakeTimeout)
	var he *mesh.HandshakeError
	switch {
	case errors.As(err, &he):
		raw.Close()
		return nil, &mesh.HandshakeError{Result: he.Result, Err: fmt.Errorf("hbone %s: %w", addr, he.Err)}
	case err == nil && tc.ConnectionState().NegotiatedProtocol != hboneALPN:
		err = fmt.Errorf("hbone %s did not negotiate ALPN %q: not an HBONE listener", addr, hboneALPN)
	}
	if err != nil {
		raw.Close()
		return nil, &mesh.HandshakeError{Result: mesh.ResultOther, Err: err}
	}
	opts := p.hbone.pool.opts
	opts.Cork = cork
	c := hb.NewClient(tc, opts)
	if err := c.WaitSettings(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("hbone %s: %w", addr, err)
	}
	return newHBONEConn(c, peer, raw.LocalAddr(), raw.RemoteAddr()), nil
}
