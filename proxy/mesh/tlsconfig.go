package mesh

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// PolicySource gives the policy snapshot in force; *policy.Store satisfies it.
// Each connection reads it once, so a reload applies to new connections.
type PolicySource interface {
	Current() *policy.Snapshot
}

// MaxClientConfigs bounds a cache of mesh client configs (ClientConfigs,
// and the sidecar's HBONE variants); it is emptied when full.
const MaxClientConfigs = 1024

// maxClientSessions bounds the TLS sessions kept for resumption, shared by
// every config of a ClientConfigs (keyed by SNI, else the server address).
const maxClientSessions = 1024

// ClientConfigs caches mesh client TLS configs by (SNI, expected
// identities), so each distinct destination builds its config once and
// handshakes reuse it. The sidecar's outbound side and the gateway share it.
type ClientConfigs struct {
	src tlsmgr.Source
	// sessions resumes TLS 1.3 sessions; it forgets them all when src's
	// generation changes, and VerifyConnection re-checks every resumed peer.
	sessions tls.ClientSessionCache
	curves   []tls.CurveID // nil: crypto/tls's default (hybrid post-quantum first)
	mu       sync.Mutex
	m        map[string]*tls.Config
}

// UseKeyExchange sets the key exchange of the configs Get returns from now
// on; call it before the first Get.
func (c *ClientConfigs) UseKeyExchange(kx KeyExchange) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.curves = kx.Curves()
	clear(c.m)
}

// NewClientConfigs returns an empty cache of configs presenting src's SVID.
func NewClientConfigs(src tlsmgr.Source) *ClientConfigs {
	return &ClientConfigs{
		src:      src,
		sessions: tlsmgr.NewClientSessionCache(src, maxClientSessions),
		m:        make(map[string]*tls.Config),
	}
}

// Get returns the config (ALPN istio) that sends sni and accepts a server
// presenting one of ids, or, if ids is empty, any member of td.
func (c *ClientConfigs) Get(sni string, ids []spiffeid.ID, td spiffeid.TrustDomain) *tls.Config {
	var key string
	if len(ids) > 0 {
		key = sni + "|id|" + JoinIDs(ids)
	} else {
		key = sni + "|td|" + td.String()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cfg, ok := c.m[key]; ok {
		return cfg
	}
	authz := AuthorizeMemberOf(td)
	if len(ids) > 0 {
		authz = AuthorizeIDs(append([]spiffeid.ID(nil), ids...))
	}
	cfg := tlsmgr.ClientConfig(c.src, authz, tlsmgr.ALPNIstio)
	cfg.ServerName = sni
	cfg.ClientSessionCache = c.sessions
	cfg.CurvePreferences = c.curves
	// Full-size records from the first byte: the slow-start concern behind
	// small first records does not apply between sidecars, and each record
	// costs a write syscall in crypto/tls.
	cfg.DynamicRecordSizingDisabled = true
	if len(c.m) >= MaxClientConfigs {
		clear(c.m)
	}
	c.m[key] = cfg
	return cfg
}

// KeyExchange is the TLS 1.3 key exchange of mesh connections.
type KeyExchange string

// Key exchanges (--tls-key-exchange).
const (
	// KeyExchangeHybridPQ is X25519MLKEM768 (post-quantum hybrid) first,
	// X25519 for peers without it: crypto/tls's default.
	KeyExchangeHybridPQ KeyExchange = "hybrid-pq"
	// KeyExchangeX25519 is X25519 only: cheaper handshakes, no
	// post-quantum protection.
	KeyExchangeX25519 KeyExchange = "x25519"
)

// ParseKeyExchange parses hybrid-pq or x25519.
func ParseKeyExchange(s string) (KeyExchange, error) {
	switch k := KeyExchange(s); k {
	case KeyExchangeHybridPQ, KeyExchangeX25519:
		return k, nil
	}
	return "", fmt.Errorf("key exchange %q: want hybrid-pq or x25519", s)
}

// Curves is the tls.Config.CurvePreferences of kx (nil: the default).
func (kx KeyExchange) Curves() []tls.CurveID {
	if kx == KeyExchangeX25519 {
		return []tls.CurveID{tls.X25519}
	}
	return nil
}

// ServerConfig builds the mesh server config that terminates mesh mTLS,
// accepting any peer of a trust domain src has a bundle for. Its session
// tickets are bound to src's generation and to pol's (nil: none), so a
// session resumed after a trust bundle or policy change is refused and a
// full handshake follows.
func ServerConfig(src tlsmgr.Source, pol PolicySource) *tls.Config {
	return tlsmgr.ServerConfig(src, AuthorizeBundleMember(src),
		tlsmgr.WithSessionGeneration(func() uint64 {
			if pol == nil {
				return 0
			}
			if snap := pol.Current(); snap != nil {
				return snap.Generation()
			}
			return 0
		}))
}

// Originate runs the client side of a mesh mTLS handshake with cfg (from
// ClientConfigs.Get) on up, a connection just dialed, bounded by timeout
// and ctx, and counts it in the outbound handshake metrics. It returns the
// TLS connection and the server's verified SPIFFE ID. A failed handshake
// is a *HandshakeError carrying its result label; up is left to the caller
// to close on error.
func Originate(ctx context.Context, up net.Conn, cfg *tls.Config, timeout time.Duration) (*tls.Conn, spiffeid.ID, error) {
	start := time.Now()
	tc := tls.Client(up, cfg)
	hctx, cancel := context.WithTimeout(ctx, timeout)
	err := Handshake(hctx, tc)
	cancel()
	if result := ObserveHandshake(DirOutbound, start, err); err != nil {
		return nil, spiffeid.ID{}, &HandshakeError{Result: result, Err: err}
	}
	// Verified already, so this cannot fail; refuse rather than guess.
	peer, err := tlsmgr.PeerID(tc.ConnectionState())
	if err != nil {
		return nil, spiffeid.ID{}, err
	}
	return tc, peer, nil
}

// Handshake runs tc's handshake, bounded by ctx, on a goroutine of its own
// and waits for it. A TLS 1.3 handshake (ML-KEM key shares, certificate
// verification) grows a goroutine's stack to 16-32 KB; run on the
// connection's own goroutine, that stack would stay with the connection for
// as long as it is open (the runtime shrinks an idle goroutine's stack only
// at a garbage collection, by half each time), though what follows, the
// copy loop, needs a few KB. A goroutine that ends gives its stack back to
// the runtime's cache for the next handshake.
func Handshake(ctx context.Context, tc *tls.Conn) error {
	done := make(chan error, 1)
	go func() { done <- tc.HandshakeContext(ctx) }()
	return <-done
}
