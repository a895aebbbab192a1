package forward

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// copyBufSize is the size of the pooled buffers of the copy loop.
const copyBufSize = 32 << 10

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, copyBufSize)
	return &b
}}

// ErrIdle is returned by Forward when the connection was aborted because
// nothing was forwarded either way for the idle timeout.
var ErrIdle = errors.New("idle timeout")

// Stats is the traffic of one forwarded connection; safe for concurrent use.
type Stats struct {
	In         atomic.Int64 // bytes read from the accepted side, sent upstream
	Out        atomic.Int64 // bytes read from upstream, sent to the accepted side
	lastActive atomic.Int64 // unix nanoseconds of the last forwarded write
}

// Touch records activity now (forwarding does this on every write).
func (s *Stats) Touch() { s.lastActive.Store(time.Now().UnixNano()) }

// LastActive is when bytes last moved (or Touch was last called).
func (s *Stats) LastActive() time.Time { return time.Unix(0, s.lastActive.Load()) }

// Forward copies between down (the accepted side) and up until both
// directions have ended. An EOF on one side is passed on as a half-close
// (CloseWrite; close_notify on TLS) so the other direction keeps flowing; an
// error either way, or no traffic for idle, calls abort, which must tear
// both connections down at once. Bytes are counted in stats and in bytes.
// Forward closes both connections before returning; after an idle abort it
// returns ErrIdle.
func Forward(down, up net.Conn, stats *Stats, idle time.Duration, abort func(), bytes prometheus.Counter) error {
	stats.Touch()
	w := &idleWatch{stats: stats, idle: idle, abort: abort}
	w.start()
	defer w.stop()

	errc := make(chan error, 1)
	go func() {
		err := copyHalf(up, down, stats, &stats.In, bytes)
		if err != nil {
			abort()
		}
		errc <- err
	}()
	err := copyHalf(down, up, stats, &stats.Out, bytes)
	if err != nil {
		abort()
	}
	err = errors.Join(err, <-errc)
	down.Close()
	up.Close()
	if w.fired.Load() {
		return ErrIdle
	}
	return err
}

// idleWatch aborts a connection that forwarded nothing for idle. One timer
// per connection, re-armed from the last activity, so reads and writes
// never touch deadlines.
type idleWatch struct {
	stats *Stats
	idle  time.Duration
	abort func()
	fired atomic.Bool

	mu      sync.Mutex
	timer   *time.Timer
	stopped bool
}

func (w *idleWatch) start() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.timer = time.AfterFunc(w.idle, w.check)
}

func (w *idleWatch) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	w.timer.Stop()
}

func (w *idleWatch) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	quiet := time.Since(w.stats.LastActive())
	if quiet < w.idle {
		w.timer.Reset(w.idle - quiet)
		return
	}
	w.fired.Store(true)
	w.abort()
}

// copyHalf copies src to dst until src ends, then half-closes dst.
func copyHalf(dst, src net.Conn, stats *Stats, n *atomic.Int64, bytes prometheus.Counter) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			if nw > 0 {
				n.Add(int64(nw))
				bytes.Add(float64(nw))
				stats.Touch()
			}
			if werr != nil {
				return fmt.Errorf("write to %s: %w", dst.RemoteAddr(), werr)
			}
		}
		if rerr == io.EOF {
			return CloseWrite(dst)
		}
		if rerr != nil {
			return fmt.Errorf("read from %s: %w", src.RemoteAddr(), rerr)
		}
	}
}

// CloseWrite passes an end of stream on to c: a TCP FIN, or a TLS
// close_notify.
func CloseWrite(c net.Conn) error {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return fmt.Errorf("half-close %s: unsupported on %T", c.RemoteAddr(), c)
	}
	if err := cw.CloseWrite(); err != nil {
		return fmt.Errorf("half-close %s: %w", c.RemoteAddr(), err)
	}
	return nil
}
