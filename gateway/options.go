package gateway

import (
	"context"
	"log/slog"
	"maps"
	"net"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults for the timeouts a Gateway applies.
const (
	DefaultDetectTimeout    = 5 * time.Second  // for a client's ClientHello
	DefaultHandshakeTimeout = 10 * time.Second // each TLS handshake, client and mesh side
	DefaultIdleTimeout      = time.Hour
	DefaultDialTimeout      = 10 * time.Second
	DefaultPollInterval     = 2 * time.Second
	DefaultNamespace        = "istio-system"
)

// Dialer opens upstream connections; *net.Dialer satisfies it. Host names
// are resolved at dial time.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Option configures a Gateway.
type Option func(*options)

type options struct {
	log              *slog.Logger
	td               spiffeid.TrustDomain
	namespace        string
	labels           map[string]string
	listenAddr       func(port uint16) string
	dialer           Dialer
	listenConfig     net.ListenConfig
	detectTimeout    time.Duration
	handshakeTimeout time.Duration
	idleTimeout      time.Duration
	maxConns         int
	pollEvery        time.Duration
}

func defaultOptions() options {
	return options{
		log:              slog.Default(),
		namespace:        DefaultNamespace,
		listenAddr:       func(port uint16) string { return ":" + strconv.Itoa(int(port)) },
		dialer:           &net.Dialer{Timeout: DefaultDialTimeout},
		detectTimeout:    DefaultDetectTimeout,
		handshakeTimeout: DefaultHandshakeTimeout,
		idleTimeout:      DefaultIdleTimeout,
		pollEvery:        DefaultPollInterval,
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// WithTrustDomain sets the mesh trust domain that destinations must belong
// to when no DestinationRule names their SPIFFE IDs. By default it is the
// trust domain of the gateway's own SVID.
func WithTrustDomain(td spiffeid.TrustDomain) Option {
	return func(o *options) { o.td = td }
}

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
func WithDialer(d Dialer) Option {
	return func(o *options) {
		if d != nil {
			o.dialer = d
		}
	}
}

// WithListenConfig sets how listeners are bound, for socket options.
func WithListenConfig(lc net.ListenConfig) Option {
	return func(o *options) { o.listenConfig = lc }
}

// WithDetectTimeout bounds how long a client on a TLS port may take to send
// its ClientHello (default 5s).
func WithDetectTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.detectTimeout = d
		}
	}
}

// WithHandshakeTimeout bounds each TLS handshake, with the client and with
// the mesh destination (default 10s).
func WithHandshakeTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.handshakeTimeout = d
		}
	}
}

// WithIdleTimeout closes connections with no traffic either way for d
// (default 1h).
func WithIdleTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.idleTimeout = d
		}
	}
}

// WithMaxConnections caps the connections open at once over all listeners;
// past it new connections are closed immediately. Zero means no limit.
func WithMaxConnections(n int) Option {
	return func(o *options) {
		if n >= 0 {
			o.maxConns = n
		}
	}
}

// WithPollInterval sets how often Run re-reads the config and credentials
// directories in case a change escaped file notifications (default 2s).
func WithPollInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.pollEvery = d
		}
	}
}
