//lint:file-ignore SA1019 the issue mandates golang.org/x/net/http2: net/http has no ServeConn or NewClientConn over a TLS connection we handshake (and count) ourselves

package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// maxPoolAttempts bounds how often one app connection looks for a pooled
// connection (waiting for a dial in progress, or redialing a dead one).
const maxPoolAttempts = 8

// hboneConn is one pooled mesh mTLS connection speaking HTTP/2.
type hboneConn struct {
	cc     *http2.ClientConn
	peer   spiffeid.ID
	local  net.Addr
	remote net.Addr
}

// hboneDial is a dial in progress that other app connections for the same
// key wait for instead of dialing too.
type hboneDial struct {
	done chan struct{}
	err  error
}

// hbonePool keeps the outbound HBONE connections, several per key once one
// is full (the server's SETTINGS_MAX_CONCURRENT_STREAMS).
type hbonePool struct {
	tr *http2.Transport

	mu     sync.Mutex
	conns  map[string][]*hboneConn
	dials  map[string]*hboneDial
	cfgs   map[string]*tls.Config
	closed bool
}

func newHBONEPool(idle time.Duration) *hbonePool {
	return &hbonePool{
		tr: &http2.Transport{
			IdleConnTimeout: idle,
			// Find a dead peer before an app connection does.
			ReadIdleTimeout: 30 * time.Second,
			PingTimeout:     15 * time.Second,
		},
		conns: make(map[string][]*hboneConn),
		dials: make(map[string]*hboneDial),
		cfgs:  make(map[string]*tls.Config),
	}
}

var errPoolClosed = errors.New("hbone pool closed")

// get returns a pooled connection for key with a stream reserved on it,
// dialing one (once, however many callers wait) if none has room.
func (pl *hbonePool) get(ctx context.Context, key string, dial func() (*hboneConn, error)) (*hboneConn, error) {
	for range maxPoolAttempts {
		pl.mu.Lock()
		if pl.closed {
			pl.mu.Unlock()
			return nil, errPoolClosed
		}
		live := pl.conns[key][:0]
		var found *hboneConn
		for _, c := range pl.conns[key] {
			if c.cc.State().Closed {
				continue
			}
			live = append(live, c)
			if found == nil && c.cc.ReserveNewRequest() {
				found = c
			}
		}
		clear(pl.conns[key][len(live):])
		if len(live) == 0 {
			delete(pl.conns, key)
		} else {
			pl.conns[key] = live
		}
		if found != nil {
			pl.mu.Unlock()
			return found, nil
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
		if err == nil && pl.closed {
			err = errPoolClosed
			c.cc.Close()
		}
		if err != nil {
			pl.mu.Unlock()
			return nil, err
		}
		pl.conns[key] = append(pl.conns[key], c)
		pl.mu.Unlock()
		// Others may have taken its streams meanwhile: look again.
	}
	return nil, fmt.Errorf("no hbone connection with a free stream after %d attempts", maxPoolAttempts)
}

// size is the number of pooled connections, for tests.
func (pl *hbonePool) size() int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	n := 0
	for _, cs := range pl.conns {
		for _, c := range cs {
			if !c.cc.State().Closed {
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
			c.cc.Close()
		}
	}
}

// clientConfig is the HBONE (ALPN h2) variant of the direct path's client
// config for the same SNI and expected identities.
func (pl *hbonePool) clientConfig(base *mesh.ClientConfigs, sni string, ids []spiffeid.ID, td spiffeid.TrustDomain) *tls.Config {
	key := sni + "|" + mesh.JoinIDs(ids) + "|" + td.String()
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if cfg, ok := pl.cfgs[key]; ok {
		return cfg
	}
	cfg := base.Get(sni, ids, td).Clone()
	cfg.NextProtos = []string{hboneALPN}
	if len(pl.cfgs) >= mesh.MaxClientConfigs {
		clear(pl.cfgs)
	}
	pl.cfgs[key] = cfg
	return cfg
}

// originateHBONE sends one outbound connection as a CONNECT stream for dest
// over a pooled HBONE connection, verifying the server as originate does:
// it must present one of ids, or, if ids is empty, be a member of our trust
// domain; with ruleSANs the ids come from the DestinationRule covering the
// address reached (checked when the pooled connection is made).
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
	key := addr + "|" + sni + "|" + mesh.JoinIDs(ids) + "|" + td.String()
	if ruleSANs {
		// The expected ids are read from the DestinationRules when a pooled
		// connection is made, so one made under another policy generation
		// may have verified the server against rules no longer in force.
		key += fmt.Sprintf("|rule@%d", p.pol.Current().Generation())
	}
	_, destPort, _ := splitHostPort(dest)
	dial := func() (*hboneConn, error) {
		return p.dialHBONE(addr, sni, ids, ruleSANs, destPort, td, tdErr)
	}

	// A pooled connection can die between get and the request (idle close,
	// GOAWAY, peer restart); nothing was read from the app yet, so try a
	// fresh one once.
	var lastErr error
	for attempt := 0; attempt < 2; attempt++ {
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
		authority := dest
		if _, err := netip.ParseAddrPort(dest); err != nil {
			// A host name: CONNECT to the address actually reached.
			authority = netip.AddrPortFrom(mesh.AddrPort(hc.remote).Addr(), destPort).String()
		}
		up, resp, err := p.connectStream(t, hc, authority)
		if err != nil {
			lastErr = err
			if t.Context().Err() != nil {
				break
			}
			continue
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionPeerRefused, dest: dest, peer: hc.peer,
				err: fmt.Errorf("hbone peer %s answered CONNECT %s with %s", addr, authority, resp.Status)})
			return
		}
		if !t.AddSocket(up) {
			return
		}
		p.pipe(t, down, up, dest, ModeHBONE, hc.peer)
		return
	}
	p.refuse(t, refusal{mode: ModeHBONE, decision: DecisionUnreachable, dest: dest, err: lastErr})
}

// connectStream opens a CONNECT stream for authority on hc.
func (p *Proxy) connectStream(t *conntrack.Conn, hc *hboneConn, authority string) (*hboneClientStream, *http.Response, error) {
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	req := (&http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: authority},
		Host:          authority,
		Header:        make(http.Header),
		Body:          pr,
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}).WithContext(ctx)
	resp, err := hc.cc.RoundTrip(req)
	if err != nil {
		cancel()
		pw.CloseWithError(err)
		return nil, nil, fmt.Errorf("hbone CONNECT %s via %s: %w", authority, hc.remote, err)
	}
	s := &hboneClientStream{pw: pw, body: resp.Body, cancel: cancel, local: hc.local, remote: hc.remote}
	if resp.StatusCode != http.StatusOK {
		pw.CloseWithError(net.ErrClosed)
		cancel()
	}
	return s, resp, nil
}

// dialHBONE makes a new pooled connection: TCP to addr, mesh mTLS with
// ALPN h2 (counted in handshakes_total like any outbound handshake), and
// HTTP/2 up to the server's first SETTINGS, so its stream limit is known.
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
	tc, peer, err := mesh.Originate(ctx, raw, p.hbone.pool.clientConfig(p.clientTLS, sni, ids, td), p.opts.HandshakeTimeout)
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
	cc, err := p.hbone.pool.tr.NewClientConn(tc)
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("hbone %s: %w", addr, err)
	}
	if err := cc.Ping(ctx); err != nil {
		cc.Close()
		return nil, fmt.Errorf("hbone %s: first ping: %w", addr, err)
	}
	return &hboneConn{cc: cc, peer: peer, local: raw.LocalAddr(), remote: raw.RemoteAddr()}, nil
}
