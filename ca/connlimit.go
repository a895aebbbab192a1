package ca

import (
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"github.com/meshproxy/meshproxy/internal/ratelog"
	"github.com/meshproxy/meshproxy/metrics"
)

// limitListener accepts at most max connections at once; one past it is
// accepted and closed at once (not left in the backlog, where it would
// hold a slot of the kernel's queue), counted and logged.
type limitListener struct {
	net.Listener
	max    int64
	active atomic.Int64
	log    *ratelog.Limiter
}

func newLimitListener(l net.Listener, max int, log *slog.Logger) net.Listener {
	if max <= 0 {
		return l
	}
	return &limitListener{Listener: l, max: int64(max), log: ratelog.New(log, 0)}
}

// Accept implements net.Listener.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.active.Add(1) > l.max {
			l.active.Add(-1)
			metrics.CAConnectionsRefused.Inc()
			l.log.Warn("over_limit", "ca connection refused: --max-connections reached", "peer", c.RemoteAddr().String(), "max_connections", l.max)
			_ = c.Close()
			continue
		}
		return &limitedConn{Conn: c, release: func() { l.active.Add(-1) }}, nil
	}
}

// limitedConn gives its slot back once, on the first Close.
type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
