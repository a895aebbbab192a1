package conntrack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Reasons Admit turns a connection away.
var (
	ErrClosing   = errors.New("shutting down")
	ErrOverLimit = errors.New("connection limit reached")
)

// Table holds the open connections of a data plane and the accept loops
// feeding it. The zero value is not usable; create one with NewTable.
type Table struct {
	log      *slog.Logger
	max      int
	acceptWG sync.WaitGroup
	connWG   sync.WaitGroup

	mu      sync.Mutex
	closing bool
	conns   map[*Conn]struct{}
}

// NewTable returns an empty table admitting up to limit connections at once
// (0: no limit); log receives the accept and drain warnings.
func NewTable(log *slog.Logger, limit int) *Table {
	return &Table{log: log, max: limit, conns: make(map[*Conn]struct{})}
}

// Serve accepts connections on ln in the background, handing each to
// accept, until ln is closed. A failed accept (out of descriptors and the
// like) is logged with attrs and retried after a growing pause.
func (tb *Table) Serve(ln net.Listener, accept func(net.Conn), attrs ...any) {
	tb.acceptWG.Add(1)
	go func() {
		defer tb.acceptWG.Done()
		var backoff time.Duration
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// Out of descriptors and the like: wait a little, keep serving.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				tb.log.Warn("accept failed", append(attrs[:len(attrs):len(attrs)], "err", err, "retry_in", backoff)...)
				time.Sleep(backoff)
				continue
			}
			backoff = 0
			accept(c)
		}
	}()
}

// Admit registers the accepted socket c and runs handle on it in a new
// goroutine; when handle returns the connection is aborted (a no-op after
// a clean close) and forgotten. active counts the open connections. While
// shutting down it returns ErrClosing, past the limit ErrOverLimit; c is
// then left to the caller to close.
func (tb *Table) Admit(parent context.Context, direction string, c net.Conn, active prometheus.Gauge, handle func(*Conn)) error {
	tb.mu.Lock()
	if tb.closing {
		tb.mu.Unlock()
		return ErrClosing
	}
	if tb.max > 0 && len(tb.conns) >= tb.max {
		tb.mu.Unlock()
		return ErrOverLimit
	}
	t := NewConn(parent, direction, c)
	tb.conns[t] = struct{}{}
	tb.connWG.Add(1)
	tb.mu.Unlock()

	active.Inc()
	go func() {
		defer tb.release(t, active)
		handle(t)
	}()
	return nil
}

func (tb *Table) release(t *Conn, active prometheus.Gauge) {
	t.Abort() // closes anything still open; a no-op after a clean close
	active.Dec()
	tb.mu.Lock()
	delete(tb.conns, t)
	tb.mu.Unlock()
	tb.connWG.Done()
}

// Close makes Admit refuse every new connection.
func (tb *Table) Close() {
	tb.mu.Lock()
	tb.closing = true
	tb.mu.Unlock()
}

// Drain waits for the accept loops to end (the caller closes their
// listeners) and lets open connections finish until ctx is done, then
// aborts the rest and returns ctx's error. It returns once every
// connection goroutine has exited.
func (tb *Table) Drain(ctx context.Context) error {
	tb.acceptWG.Wait()

	done := make(chan struct{})
	go func() {
		tb.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	tb.mu.Lock()
	n := len(tb.conns)
	for t := range tb.conns {
		t.Abort()
	}
	tb.mu.Unlock()
	tb.log.Warn("drain deadline reached, closing connections", "open", n)
	<-done
	return fmt.Errorf("drain: %w", ctx.Err())
}

// Len is the number of open connections.
func (tb *Table) Len() int {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return len(tb.conns)
}

// Peers lists the established connections.
func (tb *Table) Peers() []PeerInfo {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	out := make([]PeerInfo, 0, len(tb.conns))
	for t := range tb.conns {
		if pi, ok := t.Info(); ok {
			out = append(out, pi)
		}
	}
	return out
}
