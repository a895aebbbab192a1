package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// OriginalDstFunc returns where a redirected connection was originally
// going (SO_ORIGINAL_DST, the TPROXY local address, or an eBPF map lookup).
type OriginalDstFunc func(net.Conn) (netip.AddrPort, error)

// ListenFunc binds a listener; redirect.ListenTransparent is one.
type ListenFunc func(ctx context.Context, network, addr string) (net.Listener, error)

// InboundDialFunc connects to the app at addr on behalf of client, the
// peer of a connection the transparent inbound listener accepted, e.g. from
// client's own address as redirect.DialTransparent does.
type InboundDialFunc func(ctx context.Context, client netip.AddrPort, network, addr string) (net.Conn, error)

// Option configures a Proxy.
type Option = mesh.Option[*options]

type listenerSpec struct {
	kind   listenerKind
	listen string
	target string      // app address (inbound explicit) or destination (outbound explicit)
	id     spiffeid.ID // expected server ID (outbound explicit); zero = any in trust domain
}

type options struct {
	mesh.Settings // shared with the gateway
	listeners     []listenerSpec
	meshCIDRs     []netip.Prefix
	originalDst   OriginalDstFunc
	inboundListen ListenFunc
	inboundDialer InboundDialFunc
	hbone         hboneOptions // see hbone.go
	keyExchange   mesh.KeyExchange
	// credentialsDir holds the files of DestinationRule credentialNames.
	credentialsDir string
}

func defaultOptions() options {
	return options{Settings: mesh.DefaultSettings(), hbone: defaultHBONEOptions()}
}

// WithInboundTransparent adds the redirected inbound listener (":15006" in
// a pod). Connections go to their original destination, which also gives
// the port that policy is evaluated for; it needs WithOriginalDst.
func WithInboundTransparent(addr string) Option {
	return func(o *options) {
		o.listeners = append(o.listeners, listenerSpec{kind: inboundTransparent, listen: addr})
	}
}

// WithOutboundTransparent adds the redirected outbound listener (":15001"
// in a pod); it needs WithOriginalDst.
func WithOutboundTransparent(addr string) Option {
	return func(o *options) {
		o.listeners = append(o.listeners, listenerSpec{kind: outboundTransparent, listen: addr})
	}
}

// WithInboundExplicit adds a listener on listen that handles inbound
// connections as the transparent listener does but forwards them to app
// (host:port); policy is evaluated for app's port.
func WithInboundExplicit(listen, app string) Option {
	return func(o *options) {
		o.listeners = append(o.listeners, listenerSpec{kind: inboundExplicit, listen: listen, target: app})
	}
}

// WithOutboundExplicit adds a listener on listen that accepts plaintext and
// always originates mesh mTLS to dest (host:port). The server must present
// id; a zero id accepts the SANs of a matching DestinationRule, else any
// member of the trust domain.
func WithOutboundExplicit(listen, dest string, id spiffeid.ID) Option {
	return func(o *options) {
		o.listeners = append(o.listeners, listenerSpec{kind: outboundExplicit, listen: listen, target: dest, id: id})
	}
}

// WithMeshCIDRs sets the outbound destinations that get mesh mTLS unless a
// DestinationRule says otherwise.
func WithMeshCIDRs(cidrs []netip.Prefix) Option {
	return func(o *options) { o.meshCIDRs = append([]netip.Prefix(nil), cidrs...) }
}

// WithOriginalDst sets how transparent listeners learn a connection's
// original destination.
func WithOriginalDst(fn OriginalDstFunc) Option {
	return func(o *options) { o.originalDst = fn }
}

// WithKeyExchange sets the TLS key exchange of mesh connections, both
// ways (default mesh.KeyExchangeHybridPQ).
func WithKeyExchange(kx mesh.KeyExchange) Option {
	return func(o *options) { o.keyExchange = kx }
}

// WithDetectTimeout sets how long inbound sniffing waits for the first
// bytes before treating the connection as server-speaks-first plaintext
// (default 5s).
func WithDetectTimeout(d time.Duration) Option { return mesh.WithDetectTimeout[*options](d) }

// WithIdleTimeout closes connections with no traffic either way for d
// (default 1h).
func WithIdleTimeout(d time.Duration) Option { return mesh.WithIdleTimeout[*options](d) }

// WithHandshakeTimeout bounds each mesh TLS handshake (default 10s).
func WithHandshakeTimeout(d time.Duration) Option { return mesh.WithHandshakeTimeout[*options](d) }

// WithMaxConnections caps the connections open at once over all listeners;
// past it new connections are closed immediately. Zero means no limit.
func WithMaxConnections(n int) Option { return mesh.WithMaxConnections[*options](n) }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return mesh.WithLogger[*options](l) }

// WithTrustDomain sets the workload's trust domain, which outbound servers
// must belong to when no SPIFFE ID is expected. By default it is the trust
// domain of the Source's current SVID.
func WithTrustDomain(td spiffeid.TrustDomain) Option { return mesh.WithTrustDomain[*options](td) }

// WithDialer sets how upstream connections are opened (default a
// net.Dialer with a 10s timeout); a caller can mark or bind the proxy's own
// sockets here.
func WithDialer(d mesh.Dialer) Option { return mesh.WithDialer[*options](d) }

// WithListenConfig sets how listeners are bound, for socket options such as
// IP_TRANSPARENT that TPROXY capture needs.
func WithListenConfig(lc net.ListenConfig) Option { return mesh.WithListenConfig[*options](lc) }

// WithInboundListen sets how the transparent inbound listener
// (WithInboundTransparent) is bound, and only that one: for TPROXY capture,
// redirect.ListenTransparent (IP_TRANSPARENT, so the accepted connections
// keep their original destination). Other listeners use WithListenConfig.
func WithInboundListen(fn ListenFunc) Option {
	return func(o *options) { o.inboundListen = fn }
}

// WithInboundDialer sets how connections accepted by the transparent
// inbound listener reach the app, instead of the Dialer: for TPROXY
// capture, from the client's own address, so the app sees the real client
// (redirect.DialTransparent). A client with a loopback or unknown address is
// dialed with the Dialer instead (logged once). Explicit inbound listeners
// always use the Dialer.
func WithInboundDialer(fn InboundDialFunc) Option {
	return func(o *options) { o.inboundDialer = fn }
}
