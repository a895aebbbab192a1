package forward

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshproxy/meshproxy/internal/rawsock"
	"github.com/prometheus/client_golang/prometheus"
)

// The copy loop's pooled buffers: copyBufSize once data flows, bulkBufSize
// once a direction fills even that (a bulk transfer: fewer read and write
// system calls per byte, and 32 full TLS records per write, which a mesh
// connection's CorkConn hands the socket at once — on a host whose TCP
// paces (BBR), the size of each write to the mesh socket sets how fast a
// transfer goes: 512 KiB writes made bulk 1.12x faster than 128 KiB ones,
// 1 MiB no faster than 512; bench/RESULTS.md, eleventh pass).
const (
	copyBufSize = 32 << 10
	bulkBufSize = 512 << 10
)

var (
	bufPool = sync.Pool{New: func() any {
		b := make([]byte, copyBufSize)
		return &b
	}}
	bulkPool = sync.Pool{New: func() any {
		b := make([]byte, bulkBufSize)
		return &b
	}}
)

// ErrIdle is returned by Forward when the connection was aborted because
// nothing was forwarded either way for the idle timeout.
var ErrIdle = errors.New("idle timeout")

// Stats is the traffic of one forwarded connection; safe for concurrent use.
type Stats struct {
	In         atomic.Int64 // bytes read from the accepted side, sent upstream
	Out        atomic.Int64 // bytes read from upstream, sent to the accepted side
	lastActive atomic.Int64 // unix nanoseconds of the last forwarded write
	spliced    atomic.Int64 // bytes of In and Out moved by splice(2), kernel to kernel
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

// Sizes of the copy loop. A direction blocks in Read on a small buffer of
// its own while idle, so an idle connection holds no large buffer; a read
// that fills it means data is flowing, and the direction takes a pooled
// copyBufSize buffer (or, TCP to TCP, splices), then a bulkBufSize one if
// a read fills that too, until a read comes back shorter than burstEnd, a
// full TLS record.
const (
	smallBufSize = 2 << 10
	burstEnd     = 16 << 10
)

// Splicing moves at most spliceChunk bytes per call, and stops waiting for
// more after spliceSlice without data: counters and the idle watch see
// spliced traffic at least that often.
const (
	spliceChunk = 1 << 20
	spliceSlice = time.Second
)

// A Pusher is a source that writes what it receives to a destination
// itself, as it arrives, rather than being read: an HBONE stream, whose
// connection's reader writes a frame's data straight to the app socket
// when nothing of the stream waits (no goroutine hand-off per message).
type Pusher interface {
	// PushTo writes everything the source receives to dst, calling count
	// with every write's byte count (from any goroutine), until the
	// source ends (nil: then dst is half-closed) or fails.
	PushTo(dst net.Conn, count func(int64)) error
}

// A RecordReader is a source whose Read returns less than it has — a mesh
// TLS connection returns one record — and that can read the rest of what
// came with it without waiting, so the records that came together reach
// the app in one write. (A plain socket's Read returns all it holds: it is
// no RecordReader.)
type RecordReader interface {
	// ReadMore reads only what needs no wait: 0 and a nil error when
	// nothing does.
	ReadMore(p []byte) (int, error)
}

// copyHalf copies src to dst until src ends, then half-closes dst. Between
// two plain TCP sockets (passthrough) bursts go through
// (*net.TCPConn).ReadFrom, which splices in the kernel; a Pusher writes to
// dst itself.
func copyHalf(dst, src net.Conn, stats *Stats, n *atomic.Int64, bytes prometheus.Counter) error {
	count := func(nw int64) {
		if nw > 0 {
			n.Add(nw)
			bytes.Add(float64(nw))
			stats.Touch()
		}
	}
	if p, ok := src.(Pusher); ok {
		if err := p.PushTo(dst, count); err != nil {
			return err
		}
		return CloseWrite(dst)
	}
	small := make([]byte, smallBufSize)
	buf := small
	var bp *[]byte      // the pooled buffer in use, if any
	var pool *sync.Pool // where bp goes back
	release := func() {
		if bp != nil {
			pool.Put(bp)
			bp, buf = nil, small
		}
	}
	defer release()
	srcTCP, srcOK := src.(*net.TCPConn)
	dstTCP, dstOK := dst.(*net.TCPConn)
	var sp *splicer
	if srcOK && dstOK {
		sp = &splicer{dst: dstTCP, src: srcTCP, spliced: &stats.spliced}
	}
	// Plain sockets are read and written with raw system calls (see
	// internal/rawsock); the errors name the connections as before.
	rsrc, rdst := rawsock.Wrap(src), rawsock.Wrap(dst)
	gather, _ := src.(RecordReader)
	for {
		nr, rerr := rsrc.Read(buf)
		for gather != nil && bp != nil && rerr == nil && nr > 0 && nr < len(buf) {
			// More that came with it (a TLS source returns a record a
			// Read): into the same write. Only while data flows (a pooled
			// buffer is in use): between requests and answers there is
			// seldom more, and looking costs a system call.
			m, err := gather.ReadMore(buf[nr:])
			nr += m
			rerr = err
			if m == 0 {
				break
			}
		}
		if nr > 0 {
			nw, werr := rdst.Write(buf[:nr])
			count(int64(nw))
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
		switch {
		case nr == len(buf) && sp != nil:
			eof, err := sp.burst(count)
			if err != nil {
				return err
			}
			if eof {
				return CloseWrite(dst)
			}
		case nr == len(buf) && bp == nil:
			pool = &bufPool
			bp = pool.Get().(*[]byte)
			buf = *bp
		case nr == len(buf) && pool == &bufPool:
			release()
			pool = &bulkPool
			bp = pool.Get().(*[]byte)
			buf = *bp
		case bp != nil && nr < burstEnd:
			release()
		}
	}
}

// splicer copies one direction between two TCP sockets in the kernel.
type splicer struct {
	dst, src *net.TCPConn
	spliced  *atomic.Int64
	lr       io.LimitedReader
}

// burst splices src to dst while data keeps coming (a pause of spliceSlice
// ends it), counting as it goes. eof reports that src ended.
func (s *splicer) burst(count func(int64)) (eof bool, err error) {
	defer s.src.SetReadDeadline(time.Time{}) //nolint:errcheck // a closed socket fails the next Read anyway
	for {
		if err := s.src.SetReadDeadline(time.Now().Add(spliceSlice)); err != nil {
			return false, fmt.Errorf("read from %s: %w", s.src.RemoteAddr(), err)
		}
		s.lr.R, s.lr.N = s.src, spliceChunk
		nw, err := s.dst.ReadFrom(&s.lr)
		s.spliced.Add(nw)
		count(nw)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return false, nil // the flow paused: back to a blocking small Read
		case err != nil:
			return false, fmt.Errorf("splice %s to %s: %w", s.src.RemoteAddr(), s.dst.RemoteAddr(), err)
		case s.lr.N > 0:
			return true, nil // ReadFrom stopped short of the chunk without error: EOF
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
