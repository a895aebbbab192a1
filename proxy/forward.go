package proxy

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

// forward copies between down (the accepted side) and up until both
// directions have ended. An EOF on one side is passed on as a half-close
// (CloseWrite; close_notify on TLS) so the other direction keeps flowing; an
// error either way, or no traffic for idle, aborts both. It closes both
// connections before returning.
func forward(t *tracked, down, up net.Conn, idle time.Duration, bytes prometheus.Counter) (err error) {
	w := &idleWatch{t: t, idle: idle}
	w.start()
	defer w.stop()

	errc := make(chan error, 1)
	go func() {
		err := copyHalf(up, down, t, &t.bytesIn, bytes)
		if err != nil {
			t.abort()
		}
		errc <- err
	}()
	err = copyHalf(down, up, t, &t.bytesOut, bytes)
	if err != nil {
		t.abort()
	}
	err = errors.Join(err, <-errc)
	down.Close()
	up.Close()
	if w.fired.Load() {
		return errIdle
	}
	return err
}

var errIdle = errors.New("idle timeout")

// idleWatch aborts a connection that forwarded nothing for idle. One timer
// per connection, re-armed from the last activity, so reads and writes
// never touch deadlines.
type idleWatch struct {
	t     *tracked
	idle  time.Duration
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
	quiet := time.Since(time.Unix(0, w.t.lastActive.Load()))
	if quiet < w.idle {
		w.timer.Reset(w.idle - quiet)
		return
	}
	w.fired.Store(true)
	w.t.abort()
}

// copyHalf copies src to dst until src ends, then half-closes dst.
func copyHalf(dst, src net.Conn, t *tracked, n *atomic.Int64, bytes prometheus.Counter) error {
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
				t.touch()
			}
			if werr != nil {
				return fmt.Errorf("write to %s: %w", dst.RemoteAddr(), werr)
			}
		}
		if rerr == io.EOF {
			return closeWrite(dst)
		}
		if rerr != nil {
			return fmt.Errorf("read from %s: %w", src.RemoteAddr(), rerr)
		}
	}
}

// closeWrite passes an end of stream on to c.
func closeWrite(c net.Conn) error {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok {
		return fmt.Errorf("half-close %s: unsupported on %T", c.RemoteAddr(), c)
	}
	if err := cw.CloseWrite(); err != nil {
		return fmt.Errorf("half-close %s: %w", c.RemoteAddr(), err)
	}
	return nil
}
