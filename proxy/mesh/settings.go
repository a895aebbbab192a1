package mesh

import (
	"context"
	"log/slog"
	"net"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults for the settings both data planes share.
const (
	DefaultDetectTimeout    = 5 * time.Second  // first bytes (sidecar) or ClientHello (gateway)
	DefaultIdleTimeout      = time.Hour        // no traffic either way
	DefaultHandshakeTimeout = 10 * time.Second // each TLS handshake
	DefaultDialTimeout      = 10 * time.Second // each upstream dial
)

// Dialer opens upstream connections; *net.Dialer satisfies it. Host names
// are resolved at dial time.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Settings are what the sidecar and the gateway are both configured with.
// Each data plane's options struct embeds them, so the options below set
// them for either.
type Settings struct {
	Log              *slog.Logger
	TrustDomain      spiffeid.TrustDomain // zero: that of the current SVID (see TrustDomain)
	Dialer           Dialer
	ListenConfig     net.ListenConfig
	DetectTimeout    time.Duration
	HandshakeTimeout time.Duration
	IdleTimeout      time.Duration
	MaxConns         int // zero: no limit
}

// DefaultSettings returns the defaults: slog.Default(), a net.Dialer with
// DefaultDialTimeout, and the Default*Timeout constants.
func DefaultSettings() Settings {
	return Settings{
		Log:              slog.Default(),
		Dialer:           &net.Dialer{Timeout: DefaultDialTimeout},
		DetectTimeout:    DefaultDetectTimeout,
		HandshakeTimeout: DefaultHandshakeTimeout,
		IdleTimeout:      DefaultIdleTimeout,
	}
}

func (s *Settings) settings() *Settings { return s }

// Configurable is a data plane's options struct: a pointer to a struct
// embedding Settings.
type Configurable interface {
	settings() *Settings
}

// Option configures a data plane whose options struct is T. The sidecar
// and the gateway each name theirs (proxy.Option, gateway.Option).
type Option[T Configurable] func(T)

// WithLogger sets the logger (default slog.Default()).
func WithLogger[T Configurable](l *slog.Logger) Option[T] {
	return func(o T) {
		if l != nil {
			o.settings().Log = l
		}
	}
}

// WithTrustDomain sets the trust domain that mesh destinations must belong
// to when no SPIFFE ID is expected. By default it is the trust domain of
// the Source's current SVID.
func WithTrustDomain[T Configurable](td spiffeid.TrustDomain) Option[T] {
	return func(o T) { o.settings().TrustDomain = td }
}

// WithDialer sets how upstream connections are opened (default a
// net.Dialer with a 10s timeout); a caller can mark or bind the data
// plane's own sockets here.
func WithDialer[T Configurable](d Dialer) Option[T] {
	return func(o T) {
		if d != nil {
			o.settings().Dialer = d
		}
	}
}

// WithListenConfig sets how listeners are bound, for socket options such as
// IP_TRANSPARENT that TPROXY capture needs.
func WithListenConfig[T Configurable](lc net.ListenConfig) Option[T] {
	return func(o T) { o.settings().ListenConfig = lc }
}

// WithDetectTimeout bounds how long a new connection may take to send its
// first bytes (default 5s): the sidecar then treats it as
// server-speaks-first plaintext, the gateway refuses it.
func WithDetectTimeout[T Configurable](d time.Duration) Option[T] {
	return func(o T) {
		if d > 0 {
			o.settings().DetectTimeout = d
		}
	}
}

// WithHandshakeTimeout bounds each TLS handshake (default 10s).
func WithHandshakeTimeout[T Configurable](d time.Duration) Option[T] {
	return func(o T) {
		if d > 0 {
			o.settings().HandshakeTimeout = d
		}
	}
}

// WithIdleTimeout closes connections with no traffic either way for d
// (default 1h).
func WithIdleTimeout[T Configurable](d time.Duration) Option[T] {
	return func(o T) {
		if d > 0 {
			o.settings().IdleTimeout = d
		}
	}
}

// WithMaxConnections caps the connections open at once over all listeners;
// past it new connections are closed immediately. Zero means no limit.
func WithMaxConnections[T Configurable](n int) Option[T] {
	return func(o T) {
		if n >= 0 {
			o.settings().MaxConns = n
		}
	}
}
