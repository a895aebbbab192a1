package proxy

import (
	"cmp"
	"net"
	"sync"

	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// DecisionConnectionPoolFull: a DestinationRule's
// connectionPool.tcp.maxConnections connections to the destination are
// open already.
const DecisionConnectionPoolFull = "connection_pool_full"

// poolLimits counts the open outbound connections of each DestinationRule
// connection pool (policy.TCPPool.Key).
type poolLimits struct {
	mu   sync.Mutex
	open map[string]int
}

// acquire takes a slot of pool; release gives it back. ok is false when
// the pool is full. A nil pool or one without a limit always has room.
func (l *poolLimits) acquire(pool *policy.TCPPool) (release func(), ok bool) {
	if pool == nil || pool.MaxConnections == 0 {
		return func() {}, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open == nil {
		l.open = map[string]int{}
	}
	if l.open[pool.Key] >= pool.MaxConnections {
		return nil, false
	}
	l.open[pool.Key]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.open[pool.Key]--; l.open[pool.Key] <= 0 {
				delete(l.open, pool.Key)
			}
		})
	}, true
}

// dialPool dials addr with pool's connect timeout and keepalive (the
// defaults for a nil pool).
func (p *Proxy) dialPool(t *conntrack.Conn, addr string, pool *policy.TCPPool) (net.Conn, error) {
	if pool == nil {
		return p.dial(t, addr)
	}
	c, err := t.Dial(p.opts.Dialer.DialContext, addr, cmp.Or(pool.ConnectTimeout, mesh.DefaultDialTimeout))
	if err != nil {
		return nil, err
	}
	applyKeepalive(c, pool)
	return c, nil
}

// applyKeepalive sets pool's TCP keepalive, if any, on c.
func applyKeepalive(c net.Conn, pool *policy.TCPPool) {
	if k := pool.Keepalive; k != nil {
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: k.Time, Interval: k.Interval, Count: k.Probes})
		}
	}
}
