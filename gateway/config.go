package gateway

import (
	"math/rand/v2"
	"sync/atomic"
)

// tlsMode is how a server treats its connections.
type tlsMode int

const (
	modeTCP             tlsMode = iota // protocol TCP: plain TCP in, mesh mTLS out
	modePassthrough                    // TLS routed by SNI, forwarded untouched
	modeSimple                         // TLS terminated with the credential's certificate
	modeMutual                         // as SIMPLE, and a client certificate from NAME-ca.crt is required
	modeIstioMutual                    // mesh mTLS terminated with the gateway's SVID (east-west), then routed as SIMPLE
	modeAutoPassthrough                // SNI outbound_.PORT_._.HOST: forwarded untouched to HOST:PORT
)

func (m tlsMode) String() string {
	return [...]string{"TCP", "PASSTHROUGH", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL", "AUTO_PASSTHROUGH"}[m]
}

// config is one validated, immutable gateway configuration: the listeners
// with their servers, and each server's routes in match order.
type config struct {
	gen   uint64
	ports map[uint16]*portConfig
	// credentials referenced by servers; true when one needs a client CA.
	credentials map[string]bool
}

// portConfig is one listener: either plain TCP servers or TLS servers told
// apart by SNI.
type portConfig struct {
	port    uint16
	label   string // the listener metric label: the port number
	tcp     bool
	servers []*server
}

// server is one Gateway server bound to a port.
type server struct {
	gateway    string // namespace/name of the Gateway
	index      int    // in spec.servers
	portNum    uint16
	name       string
	protocol   string
	hosts      []serverHost
	mode       tlsMode
	credential string
	minVersion uint16
	maxVersion uint16
	routes     []*route

	// tls.Config for the credential currently loaded; rebuilt when it changes.
	tlsCache atomic.Pointer[serverTLS]
}

// serverHost is one entry of a server's hosts: "namespace/host", where the
// namespace ("*" for any) says whose VirtualServices may bind to it.
type serverHost struct {
	ns   string
	host host
}

// route is one tls or tcp route of a VirtualService, as it applies to one
// server.
type route struct {
	name    string // namespace/name of the VirtualService: the route metric label
	kind    string // "tls" or "tcp"
	index   int    // in spec.tls or spec.tcp
	matches []routeMatch
	dests   []destination
	weights int // sum of the weights
	// scope is the server's hosts whose namespace part admits the
	// VirtualService: the only names the route may serve (nil on TCP
	// servers, which have no SNI).
	scope []host
}

type routeMatch struct {
	port uint16 // 0: any
	sni  []host // tls routes only
}

type destination struct {
	host   string // DNS name or IP, resolved at dial time
	port   uint16
	weight int
	addr   string // host:port
}

// server picks the server on this port for a client's SNI: the most specific
// host pattern that covers it. nil when none does.
func (p *portConfig) server(sni string) *server {
	var best *server
	bestScore := -1
	for _, s := range p.servers {
		for _, h := range s.hosts {
			if sc := h.host.specificity(); h.host.matches(sni) && sc > bestScore {
				best, bestScore = s, sc
			}
		}
	}
	return best
}

// tcpRoute returns the first tcp route of any server on a TCP port.
func (p *portConfig) tcpRoute() (*server, *route) {
	for _, s := range p.servers {
		if r := s.route(p.port, ""); r != nil {
			return s, r
		}
	}
	return nil, nil
}

// route returns the first of s's routes matching the port and SNI.
func (s *server) route(port uint16, sni string) *route {
	for _, r := range s.routes {
		if r.match(port, sni) {
			return r
		}
	}
	return nil
}

func (r *route) match(port uint16, sni string) bool {
	if r.scope != nil && !anyMatches(r.scope, sni) {
		return false
	}
	if len(r.matches) == 0 {
		return true
	}
	for _, m := range r.matches {
		if (m.port == 0 || m.port == port) && (m.sni == nil || anyMatches(m.sni, sni)) {
			return true
		}
	}
	return false
}

// pick chooses a destination by weight.
func (r *route) pick() destination {
	if len(r.dests) == 1 || r.weights == 0 {
		return r.dests[rand.IntN(len(r.dests))]
	}
	n := rand.IntN(r.weights)
	for _, d := range r.dests {
		if n < d.weight {
			return d
		}
		n -= d.weight
	}
	return r.dests[len(r.dests)-1]
}
