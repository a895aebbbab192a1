package authn

import (
	"log/slog"
	"net/http"
	"time"
)

// DefaultAudience is the audience Istio's CA requires in workload tokens.
const DefaultAudience = "istio-ca"

// Doer sends HTTP requests; *http.Client and *KubeAPI implement it.
type Doer interface {
	Do(*http.Request) (*http.Response, error)
}

// Option configures the authenticators of this package. Each uses the
// options that apply to it and ignores the rest.
type Option func(*options)

type options struct {
	log            *slog.Logger
	now            func() time.Time
	audience       string
	client         Doer
	refresh        time.Duration
	minRefresh     time.Duration
	requestTimeout time.Duration
}

func newOptions(opts []Option) options {
	o := options{
		log:            slog.Default(),
		now:            time.Now,
		audience:       DefaultAudience,
		refresh:        5 * time.Minute,
		minRefresh:     30 * time.Second,
		requestTimeout: 10 * time.Second,
	}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithAudience sets the audience tokens must carry (default "istio-ca").
func WithAudience(aud string) Option { return func(o *options) { o.audience = aud } }

// WithHTTPClient sets how JWKS documents are fetched (default
// http.DefaultClient); pass a *KubeAPI to fetch the API server's
// /openid/v1/jwks with its credentials.
func WithHTTPClient(c Doer) Option { return func(o *options) { o.client = c } }

// WithRefresh sets how often a JWKS URL is re-fetched (default 5m) and the
// least time between fetches triggered by an unknown key ID (default 30s).
func WithRefresh(every, minInterval time.Duration) Option {
	return func(o *options) { o.refresh, o.minRefresh = every, minInterval }
}

// WithRequestTimeout bounds each call to a backend (default 10s).
func WithRequestTimeout(d time.Duration) Option { return func(o *options) { o.requestTimeout = d } }
