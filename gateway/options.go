package gateway

import (
	"log/slog"
	"maps"
	"net"
	"strconv"
	"time"

	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults of the gateway's own settings; the timeouts are mesh's
// (mesh.DefaultDetectTimeout and the others).
const (
	DefaultPollInterval = 2 * time.Second
	DefaultNamespace    = "istio-system"
)

// Option configures a Gateway.
type Option = mesh.Option[*options]

type options struct {
	mesh.Settings // shared with the sidecar
	namespace     string
	labels        map[string]string
	listenAddr    func(port uint16) string
	pollEvery     time.Duration
	strict        bool
}

func defaultOptions() options {
	return options{
		Settings:   mesh.DefaultSettings(),
		namespace:  DefaultNamespace,
		listenAddr: func(port uint16) string { return ":" + strconv.Itoa(int(port)) },
		pollEvery:  DefaultPollInterval,
	}
}

// WithStrictConfig makes any rejected Gateway or VirtualService fail the
// whole load, as before documents were isolated: New returns the error, and
// a reload keeps the last good config. By default a rejected document is
// logged and counted and left out (its servers are not bound, its routes
// not used), and the others apply.
func WithStrictConfig(strict bool) Option { return func(o *options) { o.strict = strict } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return mesh.WithLogger[*options](l) }

// WithTrustDomain sets the mesh trust domain that destinations must belong
// to when no DestinationRule names their SPIFFE IDs. By default it is the
// trust domain of the gateway's own SVID.
func WithTrustDomain(td spiffeid.TrustDomain) Option { return mesh.WithTrustDomain[*options](td) }

// WithWorkload sets the gateway workload's namespace (default
// "istio-system"), which manifests without a namespace belong to and
// VirtualService exportTo is relative to, and its labels, which Gateway
// selectors must match. With nil labels selectors are not checked: every
// Gateway in the directory configures this gateway.
func WithWorkload(namespace string, labels map[string]string) Option {
	return func(o *options) {
		if namespace != "" {
			o.namespace = namespace
		}
		o.labels = maps.Clone(labels)
	}
}

// WithListenAddr sets where the listener for a Gateway port binds (default
// ":PORT", every address). For example, bind loopback only with
// func(p uint16) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(p))) },
// or map ports elsewhere ("127.0.0.1:0" picks a free port; see Addr).
func WithListenAddr(fn func(port uint16) string) Option {
	return func(o *options) {
		if fn != nil {
			o.listenAddr = fn
		}
	}
}

// WithDialer sets how destinations are dialed (default a net.Dialer with a
// 10s timeout).
func WithDialer(d mesh.Dialer) Option { return mesh.WithDialer[*options](d) }

// WithListenConfig sets how listeners are bound, for socket options.
func WithListenConfig(lc net.ListenConfig) Option { return mesh.WithListenConfig[*options](lc) }

// WithDetectTimeout bounds how long a client on a TLS port may take to send
// its ClientHello (default 5s).
func WithDetectTimeout(d time.Duration) Option { return mesh.WithDetectTimeout[*options](d) }

// WithHandshakeTimeout bounds each TLS handshake, with the client and with
// the mesh destination (default 10s).
func WithHandshakeTimeout(d time.Duration) Option { return mesh.WithHandshakeTimeout[*options](d) }

// WithIdleTimeout closes connections with no traffic either way for d
// (default 1h).
func WithIdleTimeout(d time.Duration) Option { return mesh.WithIdleTimeout[*options](d) }

// WithMaxConnections caps the connections open at once over all listeners;
// past it new connections are closed immediately. Zero means no limit.
func WithMaxConnections(n int) Option { return mesh.WithMaxConnections[*options](n) }

// WithPollInterval sets how often Run re-reads the config and credentials
// directories in case a change escaped file notifications (default 2s).
func WithPollInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.pollEvery = d
		}
	}
}
