package tlsmgr

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Defaults of the renewal schedule (docs/CONTRACT.md, "Identity": renew
// at 50% ± 1% of lifetime, retry 0.5 s → 60 s).
const (
	DefaultTTL           = 24 * time.Hour
	DefaultRenewFraction = 0.5
	DefaultJitter        = 0.01
	DefaultBackoffMin    = 500 * time.Millisecond
	DefaultBackoffMax    = 60 * time.Second
	DefaultIssueTimeout  = 30 * time.Second
	DefaultPollInterval  = time.Minute
	MaxTTL               = 90 * 24 * time.Hour
)

// Clock is the time source of a Rotator or FileSource; tests replace it.
type Clock interface {
	Now() time.Time
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// Option configures a Rotator or a FileSource. Options that only make sense
// for one of them say so and are ignored by the other.
type Option func(*options)

type options struct {
	ttl           time.Duration
	renewFraction float64
	jitter        float64
	backoffMin    time.Duration
	backoffMax    time.Duration
	issueTimeout  time.Duration
	pollInterval  time.Duration
	clock         Clock
	logger        *slog.Logger
	trustDomain   spiffeid.TrustDomain
	id            spiffeid.ID
	bundleFile    string
}

func defaultOptions() options {
	return options{
		ttl:           DefaultTTL,
		renewFraction: DefaultRenewFraction,
		jitter:        DefaultJitter,
		backoffMin:    DefaultBackoffMin,
		backoffMax:    DefaultBackoffMax,
		issueTimeout:  DefaultIssueTimeout,
		pollInterval:  DefaultPollInterval,
		clock:         realClock{},
		logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

func buildOptions(opts []Option) (options, error) {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	var errs []error
	if o.ttl <= 0 || o.ttl > MaxTTL {
		errs = append(errs, fmt.Errorf("ttl %s out of range (0, %s]", o.ttl, MaxTTL))
	}
	if o.renewFraction <= 0 || o.renewFraction >= 1 {
		errs = append(errs, fmt.Errorf("renew fraction %g out of range (0, 1)", o.renewFraction))
	}
	if o.jitter < 0 || o.jitter >= o.renewFraction || o.jitter >= 1-o.renewFraction {
		errs = append(errs, fmt.Errorf("jitter %g must be ≥ 0 and leave the renewal inside the lifetime (renew fraction %g)", o.jitter, o.renewFraction))
	}
	if o.backoffMin <= 0 || o.backoffMax < o.backoffMin {
		errs = append(errs, fmt.Errorf("backoff %s..%s: need 0 < min ≤ max", o.backoffMin, o.backoffMax))
	}
	if o.issueTimeout <= 0 {
		errs = append(errs, fmt.Errorf("issue timeout %s must be positive", o.issueTimeout))
	}
	if o.pollInterval <= 0 {
		errs = append(errs, fmt.Errorf("poll interval %s must be positive", o.pollInterval))
	}
	if o.clock == nil {
		errs = append(errs, errors.New("clock is nil"))
	}
	if o.logger == nil {
		errs = append(errs, errors.New("logger is nil"))
	}
	if !o.id.IsZero() && !o.trustDomain.IsZero() && o.id.TrustDomain() != o.trustDomain {
		errs = append(errs, fmt.Errorf("spiffe id %s is not in trust domain %s", o.id, o.trustDomain))
	}
	if !o.id.IsZero() && o.trustDomain.IsZero() {
		o.trustDomain = o.id.TrustDomain()
	}
	return o, errors.Join(errs...)
}

// WithTTL sets the certificate lifetime a Rotator asks the CA for (default
// 24h, at most 90 days; the CA may grant less). Rotator only.
func WithTTL(d time.Duration) Option { return func(o *options) { o.ttl = d } }

// WithRenewFraction sets when a Rotator renews, as a fraction of the
// certificate's lifetime (default 0.5). Rotator only.
func WithRenewFraction(f float64) Option { return func(o *options) { o.renewFraction = f } }

// WithJitter sets the random spread of the renewal time, as a fraction of
// the lifetime on either side (default 0.01, i.e. ±1%). Rotator only.
func WithJitter(f float64) Option { return func(o *options) { o.jitter = f } }

// WithBackoff sets the retry delay after a failed renewal: it starts at min,
// doubles on each failure up to max, and is jittered (default 0.5 s → 60 s).
// Rotator only.
func WithBackoff(min, max time.Duration) Option {
	return func(o *options) { o.backoffMin, o.backoffMax = min, max }
}

// WithIssueTimeout bounds one CA request (default 30 s). Rotator only.
func WithIssueTimeout(d time.Duration) Option { return func(o *options) { o.issueTimeout = d } }

// WithPollInterval sets how often watched files are checked for changes in
// addition to filesystem notifications (default 1 min).
func WithPollInterval(d time.Duration) Option { return func(o *options) { o.pollInterval = d } }

// WithClock replaces the wall clock, for tests.
func WithClock(c Clock) Option { return func(o *options) { o.clock = c } }

// WithLogger sets the structured logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithTrustDomain requires the loaded SVID to be in td; an SVID from another
// trust domain is refused.
func WithTrustDomain(td spiffeid.TrustDomain) Option { return func(o *options) { o.trustDomain = td } }

// WithID sets the SPIFFE ID a Rotator puts in its CSR. The CA decides the
// identity from the authenticated caller, so this is only a hint; it also
// implies WithTrustDomain(id.TrustDomain()). Rotator only.
func WithID(id spiffeid.ID) Option { return func(o *options) { o.id = id } }

// WithBundleFile merges the PEM roots in path into the trust bundle of the
// SVID's trust domain (several roots during a root rotation). The file is
// re-read when it changes. Rotator only; a FileSource takes its bundle file
// as an argument.
func WithBundleFile(path string) Option { return func(o *options) { o.bundleFile = path } }
