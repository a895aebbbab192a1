package proxy

import (
	"context"
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

// tracked is one accepted connection from accept to close.
type tracked struct {
	direction string
	source    string
	since     time.Time
	ctx       context.Context
	cancel    context.CancelFunc

	mu      sync.Mutex
	sockets []net.Conn // raw sockets, closed on abort
	aborted bool
	// Set before established is stored; read only after it is loaded true.
	destination string
	mode        string
	peerID      string
	established atomic.Bool

	stats fwd.Stats // bytes each way and last activity
}

func newTracked(parent context.Context, direction string, c net.Conn) *tracked {
	ctx, cancel := context.WithCancel(parent)
	t := &tracked{direction: direction, source: c.RemoteAddr().String(), since: time.Now(), ctx: ctx, cancel: cancel}
	t.sockets = append(t.sockets, c)
	return t
}

// addSocket registers an upstream socket to close on abort. It returns false
// (and closes c) if the connection was already aborted.
func (t *tracked) addSocket(c net.Conn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.aborted {
		c.Close()
		return false
	}
	t.sockets = append(t.sockets, c)
	return true
}

// abort tears the connection down at once: pending dials and handshakes are
// cancelled and every socket is closed without a TLS close_notify, so a peer
// never mistakes an abort for a clean end of stream.
func (t *tracked) abort() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.aborted = true
	t.cancel()
	for _, c := range t.sockets {
		c.Close()
	}
}

// establish marks the connection as forwarding, visible in Peers.
func (t *tracked) establish(destination, mode, peerID string) {
	t.destination, t.mode, t.peerID = destination, mode, peerID
	t.stats.Touch()
	t.established.Store(true)
}

func (t *tracked) info() (PeerInfo, bool) {
	if !t.established.Load() {
		return PeerInfo{}, false
	}
	return PeerInfo{
		Direction:    t.direction,
		Source:       t.source,
		Destination:  t.destination,
		PeerSPIFFEID: t.peerID,
		Mode:         t.mode,
		Since:        t.since,
		BytesIn:      t.stats.In.Load(),
		BytesOut:     t.stats.Out.Load(),
	}, true
}
