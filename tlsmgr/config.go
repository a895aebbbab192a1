package tlsmgr

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ALPN protocols of Istio's mesh mTLS.
const (
	ALPNIstio     = "istio"
	ALPNIstioHTTP = "istio-http/1.1"
	ALPNIstioH2   = "istio-h2"
)

// ServerALPN is what an inbound mesh listener accepts, in preference order.
var ServerALPN = []string{ALPNIstio, ALPNIstioHTTP, ALPNIstioH2, "istio-peer-exchange"}

// Bounds of the per-config caches of verified peer chains. A server sees
// every client workload; a client config serves one destination.
const (
	serverVerifyCacheSize = 1024
	clientVerifyCacheSize = 64
)

// ServerOption customizes ServerConfig.
type ServerOption func(*serverOptions)

type serverOptions struct {
	sessionGen func() uint64
}

// WithSessionGeneration binds session tickets to gen as well as to the
// source's generation: a ticket issued while gen returned G is refused (a
// full handshake follows) once it returns anything else. Pass the policy
// generation, so that no resumed session outlives a policy change.
func WithSessionGeneration(gen func() uint64) ServerOption {
	return func(o *serverOptions) { o.sessionGen = gen }
}

// ServerConfig builds a TLS 1.3 server config that presents src's current
// certificate and requires a client SVID that chains to src's bundles and
// satisfies authz. Verification runs in VerifyConnection, which crypto/tls
// calls on every handshake, resumed ones included. Session tickets are
// bound to src's generation (and to WithSessionGeneration's): a ticket
// issued before the SVID, the trust bundles or that generation changed is
// not resumed.
func ServerConfig(src Source, authz tlsconfig.Authorizer, opts ...ServerOption) *tls.Config {
	var o serverOptions
	for _, opt := range opts {
		opt(&o)
	}
	vc := newVerifyCache(serverVerifyCacheSize)
	cfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: ServerALPN,
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return src.Certificate()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := vc.verifyPeer(src, authz, cs.PeerCertificates)
			return err
		},
	}
	binding := func() []byte {
		b := make([]byte, 0, len(ticketBindingTag)+16)
		b = append(b, ticketBindingTag...)
		b = binary.BigEndian.AppendUint64(b, src.Generation())
		var g uint64
		if o.sessionGen != nil {
			g = o.sessionGen()
		}
		return binary.BigEndian.AppendUint64(b, g)
	}
	// The closures use cfg itself, not a clone, so tickets are always
	// sealed and opened with the same keys.
	cfg.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = append(ss.Extra, binding())
		return cfg.EncryptTicket(cs, ss)
	}
	cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := cfg.DecryptTicket(identity, cs)
		if err != nil || ss == nil {
			return nil, err
		}
		want := binding()
		for _, e := range ss.Extra {
			if bytes.Equal(e, want) {
				return ss, nil
			}
		}
		return nil, nil // issued under another generation: full handshake
	}
	return cfg
}

// ticketBindingTag starts the SessionState.Extra entry that binds a ticket
// to the generations it was issued under.
const ticketBindingTag = "meshproxy/ticket-generation/v1:"

// ClientConfig builds a TLS 1.3 client config that presents src's current
// certificate, offers ALPN alpn (default "istio") and accepts a server only
// if its SVID chains to src's bundles and satisfies authz. Hostnames are
// never checked: mesh peers are identified by SPIFFE ID. ServerName is
// empty (no SNI); set it to OutboundSNI(host, port) to send Istio's SNI.
// Verification runs in VerifyConnection on every handshake, resumed ones
// included, so a cached session never outlives a trust bundle change. Set
// ClientSessionCache to NewClientSessionCache(src, n) to resume sessions.
func ClientConfig(src Source, authz tlsconfig.Authorizer, alpn ...string) *tls.Config {
	if len(alpn) == 0 {
		alpn = []string{ALPNIstio}
	}
	vc := newVerifyCache(clientVerifyCacheSize)
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         alpn,
		InsecureSkipVerify: true, // replaced by the SPIFFE check in VerifyConnection
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return src.Certificate()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := vc.verifyPeer(src, authz, cs.PeerCertificates)
			return err
		},
	}
}

// NewClientSessionCache returns a TLS session cache of at most capacity
// sessions that forgets every session once src's generation (its SVID or
// trust bundles) changes, so resumption never carries a session across a
// trust change.
func NewClientSessionCache(src Source, capacity int) tls.ClientSessionCache {
	return &clientSessionCache{src: src, capacity: capacity}
}

type clientSessionCache struct {
	src      Source
	capacity int

	mu    sync.Mutex
	gen   uint64
	cache tls.ClientSessionCache
}

// current returns the cache of src's current generation, emptied if the
// generation moved on.
func (c *clientSessionCache) current() tls.ClientSessionCache {
	gen := c.src.Generation()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cache == nil || c.gen != gen {
		c.cache, c.gen = tls.NewLRUClientSessionCache(c.capacity), gen
	}
	return c.cache
}

// Get implements tls.ClientSessionCache.
func (c *clientSessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	return c.current().Get(key)
}

// Put implements tls.ClientSessionCache.
func (c *clientSessionCache) Put(key string, cs *tls.ClientSessionState) {
	c.current().Put(key, cs)
}

// OutboundSNI is the SNI Istio clients send to a mesh destination,
// "outbound_.<port>_._.<host>"; set it as ClientConfig(...).ServerName. It is
// only a routing hint: the server is still verified by SPIFFE ID alone.
func OutboundSNI(host string, port uint16) string {
	return "outbound_." + strconv.Itoa(int(port)) + "_._." + host
}

// ErrNoPeerCertificate is returned when the peer presented no certificate.
var ErrNoPeerCertificate = errors.New("peer presented no certificate")

func authorize(authz tlsconfig.Authorizer, id spiffeid.ID, chains [][]*x509.Certificate) error {
	if authz == nil {
		return nil
	}
	if err := authz(id, chains); err != nil {
		return fmt.Errorf("authorize peer %s: %w", id, err)
	}
	return nil
}

// verifyCache remembers peer chains that verified, so a peer seen again
// skips the chain verification (the authorizer still runs every time). An
// entry holds only while the source's generation is the one it was
// verified under and the chain is inside its validity window; the map is
// emptied when full.
type verifyCache struct {
	max int

	mu sync.Mutex
	m  map[[sha256.Size]byte]*verifiedChain
}

// verifiedChain is a successful verification of one presented chain. The
// verified chains are kept as links into the presented certificates (or to
// a trust anchor), so an entry does not pin a connection's certificates.
type verifiedChain struct {
	gen                 uint64
	id                  spiffeid.ID
	notBefore, notAfter time.Time
	chains              [][]chainLink
}

// chainLink is one certificate of a verified chain: the presented
// certificate at index, or anchor when it came from the trust bundle.
type chainLink struct {
	index  int
	anchor *x509.Certificate
}

func newVerifyCache(max int) *verifyCache {
	return &verifyCache{max: max, m: make(map[[sha256.Size]byte]*verifiedChain)}
}

// chainKey hashes the presented chain, each certificate length-prefixed.
func chainKey(certs []*x509.Certificate) [sha256.Size]byte {
	h := sha256.New()
	var l [4]byte
	for _, c := range certs {
		binary.BigEndian.PutUint32(l[:], uint32(len(c.Raw)))
		h.Write(l[:])
		h.Write(c.Raw)
	}
	var key [sha256.Size]byte
	h.Sum(key[:0])
	return key
}

func (v *verifyCache) verifyPeer(src Source, authz tlsconfig.Authorizer, certs []*x509.Certificate) (spiffeid.ID, error) {
	if len(certs) == 0 {
		return spiffeid.ID{}, ErrNoPeerCertificate
	}
	key := chainKey(certs)
	// Read the generation before verifying: if the bundles change during
	// verification, the entry is stored under the old generation and
	// never used.
	gen := src.Generation()
	now := time.Now()
	v.mu.Lock()
	e := v.m[key]
	v.mu.Unlock()
	if e != nil && e.gen == gen && !now.Before(e.notBefore) && !now.After(e.notAfter) {
		return e.id, authorize(authz, e.id, e.rebuild(certs))
	}
	id, chains, err := x509svid.Verify(certs, src)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("verify peer svid: %w", err)
	}
	v.store(key, gen, id, certs, chains)
	return id, authorize(authz, id, chains)
}

func (v *verifyCache) store(key [sha256.Size]byte, gen uint64, id spiffeid.ID, certs []*x509.Certificate, chains [][]*x509.Certificate) {
	if len(chains) == 0 {
		return
	}
	e := &verifiedChain{gen: gen, id: id, chains: make([][]chainLink, len(chains))}
	for i, c := range chains[0] {
		if i == 0 || c.NotBefore.After(e.notBefore) {
			e.notBefore = c.NotBefore
		}
		if i == 0 || c.NotAfter.Before(e.notAfter) {
			e.notAfter = c.NotAfter
		}
	}
	for i, chain := range chains {
		links := make([]chainLink, len(chain))
		for j, c := range chain {
			links[j] = chainLink{index: -1, anchor: c}
			for k, p := range certs {
				if p == c {
					links[j] = chainLink{index: k}
					break
				}
			}
		}
		e.chains[i] = links
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.m) >= v.max {
		clear(v.m)
	}
	v.m[key] = e
}

// rebuild returns the verified chains made of this handshake's certs.
func (e *verifiedChain) rebuild(certs []*x509.Certificate) [][]*x509.Certificate {
	chains := make([][]*x509.Certificate, len(e.chains))
	for i, links := range e.chains {
		chain := make([]*x509.Certificate, len(links))
		for j, l := range links {
			if l.anchor != nil {
				chain[j] = l.anchor
			} else {
				chain[j] = certs[l.index]
			}
		}
		chains[i] = chain
	}
	return chains
}

// PeerID returns the SPIFFE ID of a verified peer from its connection state.
func PeerID(cs tls.ConnectionState) (spiffeid.ID, error) {
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, ErrNoPeerCertificate
	}
	return x509svid.IDFromCert(cs.PeerCertificates[0])
}
