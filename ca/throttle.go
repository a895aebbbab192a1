package ca

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Failed-authentication throttle: each source address may fail this often
// (a token bucket); past it, its requests are refused with ResourceExhausted
// before any credential is checked, until the bucket refills. Callers from
// other addresses are unaffected.
const (
	DefaultAuthFailRate  = 20 // failures a second, sustained
	DefaultAuthFailBurst = 50
	// maxThrottled bounds the sources remembered; full buckets (sources
	// that stopped failing) are dropped first.
	maxThrottled = 16384
)

// authThrottle keeps one token bucket of failed authentications per source
// (an IPv4 address, or an IPv6 /64, what one host usually holds).
type authThrottle struct {
	limit rate.Limit
	burst int
	now   func() time.Time

	mu      sync.Mutex
	sources map[netip.Prefix]*rate.Limiter
}

func newAuthThrottle(perSecond float64, burst int, now func() time.Time) *authThrottle {
	return &authThrottle{limit: rate.Limit(perSecond), burst: burst, now: now, sources: map[netip.Prefix]*rate.Limiter{}}
}

// sourceOf is the throttle key of a peer address ("IP:port").
func sourceOf(addr string) (netip.Prefix, bool) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Prefix{}, false
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	return p, err == nil
}

// wait says how long addr must wait before its next attempt: zero unless
// it has used up its failures.
func (t *authThrottle) wait(addr string) time.Duration {
	if t == nil {
		return 0
	}
	src, ok := sourceOf(addr)
	if !ok {
		return 0
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	lim := t.sources[src]
	if lim == nil {
		return 0
	}
	tokens := lim.TokensAt(t.now())
	if tokens >= 1 {
		return 0
	}
	return time.Duration((1 - tokens) / float64(t.limit) * float64(time.Second))
}

// fail records a failed authentication from addr.
func (t *authThrottle) fail(addr string) {
	if t == nil {
		return
	}
	src, ok := sourceOf(addr)
	if !ok {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	lim := t.sources[src]
	if lim == nil {
		t.makeRoom(now)
		lim = rate.NewLimiter(t.limit, t.burst)
		t.sources[src] = lim
	}
	lim.AllowN(now, 1)
}

// makeRoom drops full buckets, then arbitrary ones, when the map is full.
// Called with t.mu held.
func (t *authThrottle) makeRoom(now time.Time) {
	if len(t.sources) < maxThrottled {
		return
	}
	for k, lim := range t.sources {
		if lim.TokensAt(now) >= float64(t.burst) {
			delete(t.sources, k)
		}
	}
	for k := range t.sources {
		if len(t.sources) < maxThrottled*3/4 {
			return
		}
		delete(t.sources, k)
	}
}
