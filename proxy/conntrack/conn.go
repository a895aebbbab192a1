package conntrack

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	fwd "github.com/meshproxy/meshproxy/proxy/forward"
)

// PeerInfo describes one open, established connection, as GET /peers shows it.
// BytesIn counts bytes received from the downstream side (the connecting
// peer or app), BytesOut bytes sent back to it.
type PeerInfo struct {
	Direction    string    `json:"direction"`
	Source       string    `json:"source"`
	Destination  string    `json:"destination"`
	PeerSPIFFEID string    `json:"peer_spiffe_id"`
	Mode         string    `json:"mode"`
	Since        time.Time `json:"since"`
	BytesIn      int64     `json:"bytes_in"`
	BytesOut     int64     `json:"bytes_out"`
}

// DialFunc opens a network connection; (*net.Dialer).DialContext is one.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Conn is one accepted connection from accept to close.
type Conn struct {
	// Direction is the connection's direction as PeerInfo reports it.
	Direction string
	// Source is the remote address of the accepted socket.
	Source string
	// Since is when the connection was accepted.
	Since time.Time
	// Stats counts the bytes forwarded each way and the last activity.
	Stats fwd.Stats

	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	sockets []net.Conn // raw sockets, closed on abort
	aborted bool
	// Set before established is stored; read only after it is loaded true.
	destination string
	mode        string
	peerID      string
	established atomic.Bool
}

// NewConn tracks the accepted socket c; its context is a child of parent.
func NewConn(parent context.Context, direction string, c net.Conn) *Conn {
	ctx, cancel := context.WithCancel(parent)
	return &Conn{Direction: direction, Source: c.RemoteAddr().String(), Since: time.Now(), ctx: ctx, cancel: cancel, sockets: []net.Conn{c}}
}

// Context is cancelled when the connection is aborted.
func (t *Conn) Context() context.Context { return t.ctx }

// AddSocket registers an upstream socket to close on abort. It returns
// false (and closes c) if the connection was already aborted.
func (t *Conn) AddSocket(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.aborted {
		c.Close()
		return false
	}
	t.sockets = append(t.sockets, c)
	return true
}

// Dial opens an upstream connection to addr with dial, bounded by timeout
// and the connection's context, and registers it for abort.
func (t *Conn) Dial(dial DialFunc, addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(t.ctx, timeout)
	defer cancel()
	c, err := dial(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	if !t.AddSocket(c) {
		return nil, fmt.Errorf("dial %s: connection closed meanwhile", addr)
	}
	return c, nil
}

// Abort tears the connection down at once: pending dials and handshakes are
// cancelled and every socket is closed without a TLS close_notify, so a peer
// never mistakes an abort for a clean end of stream.
func (t *Conn) Abort() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.aborted = true
	t.cancel()
	for _, c := range t.sockets {
		c.Close()
	}
}

// Establish marks the connection as forwarding, visible in Info.
func (t *Conn) Establish(destination, mode, peerID string) {
	t.destination, t.mode, t.peerID = destination, mode, peerID
	t.Stats.Touch()
	t.established.Store(true)
}

// Info describes the connection once it is established.
func (t *Conn) Info() (PeerInfo, bool) {
	if !t.established.Load() {
		return PeerInfo{}, false
	}
	return PeerInfo{
		Direction:    t.Direction,
		Source:       t.Source,
		Destination:  t.destination,
		PeerSPIFFEID: t.peerID,
		Mode:         t.mode,
		Since:        t.Since,
		BytesIn:      t.Stats.In.Load(),
		BytesOut:     t.Stats.Out.Load(),
	}, true
}
