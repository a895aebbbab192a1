package authn

import (
	"context"
	"crypto/sha256"
	"errors"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Bounds of a Cached authenticator's result cache.
const (
	// DefaultCacheTTL is how long a verdict on a token is reused: short, so
	// a deleted pod's token (TokenReview) or a retired signing key (JWKS)
	// stops working within seconds.
	DefaultCacheTTL = 10 * time.Second
	// DefaultCacheSize bounds the number of tokens remembered.
	DefaultCacheSize = 4096
)

// Cached remembers the verdicts of a token authenticator (TokenReview,
// JWKS) for a short time, so a flood of the same token costs one check:
// callers presenting a token already being checked wait for that check.
// Only definite verdicts are kept (the token's identity, Unauthenticated or
// PermissionDenied), never an unreachable backend. Tokens are keyed by their
// SHA-256, never kept in clear.
type Cached struct {
	inner Authenticator
	ttl   time.Duration
	size  int
	now   func() time.Time

	mu      sync.Mutex
	entries map[[sha256.Size]byte]*verdict
}

type verdict struct {
	done    chan struct{} // closed once id and err are set
	id      spiffeid.ID
	err     error
	expires time.Time
}

// NewCached wraps inner with a result cache of size tokens kept for ttl
// (DefaultCacheTTL and DefaultCacheSize when zero or less).
func NewCached(inner Authenticator, ttl time.Duration, size int, opts ...Option) *Cached {
	o := newOptions(opts)
	if ttl <= 0 {
		ttl = DefaultCacheTTL
	}
	if size <= 0 {
		size = DefaultCacheSize
	}
	return &Cached{inner: inner, ttl: ttl, size: size, now: o.now, entries: map[[sha256.Size]byte]*verdict{}}
}

// Name implements Authenticator.
func (c *Cached) Name() string { return c.inner.Name() }

// Authenticate implements Authenticator.
func (c *Cached) Authenticate(ctx context.Context, caller Caller) (spiffeid.ID, error) {
	if caller.Token == "" {
		return c.inner.Authenticate(ctx, caller)
	}
	key := sha256.Sum256([]byte(caller.Token))
	c.mu.Lock()
	v, ok := c.entries[key]
	if ok {
		select {
		case <-v.done:
			if c.now().After(v.expires) {
				delete(c.entries, key)
				ok = false
			}
		default: // being checked: wait for it below
		}
	}
	if ok {
		c.mu.Unlock()
		select {
		case <-v.done:
			return v.id, v.err
		case <-ctx.Done():
			return spiffeid.ID{}, errors.Join(ErrUnavailable, ctx.Err())
		}
	}
	v = &verdict{done: make(chan struct{})}
	c.makeRoom()
	c.entries[key] = v
	c.mu.Unlock()

	v.id, v.err = c.inner.Authenticate(ctx, caller)
	v.expires = c.now().Add(c.ttl)
	keep := v.err == nil || errors.Is(v.err, ErrPermissionDenied) || (errors.Is(v.err, ErrUnauthenticated) && !errors.Is(v.err, ErrUnavailable) && ctx.Err() == nil)
	close(v.done)
	if !keep {
		c.mu.Lock()
		if c.entries[key] == v {
			delete(c.entries, key)
		}
		c.mu.Unlock()
	}
	return v.id, v.err
}

// Len is the number of tokens remembered now.
func (c *Cached) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// makeRoom, when the cache is full, drops expired verdicts, then arbitrary
// settled ones until a quarter is free, so a flood of distinct tokens
// does not pay a scan per token. Called with c.mu held.
func (c *Cached) makeRoom() {
	if len(c.entries) < c.size {
		return
	}
	now := c.now()
	for k, v := range c.entries {
		select {
		case <-v.done:
			if now.After(v.expires) {
				delete(c.entries, k)
			}
		default:
		}
	}
	for k, v := range c.entries {
		if len(c.entries) <= c.size-c.size/4-1 {
			return
		}
		select {
		case <-v.done:
			delete(c.entries, k)
		default:
		}
	}
}
