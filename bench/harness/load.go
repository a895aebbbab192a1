package harness

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ioTimeout bounds every single network operation of the load generator, so
// a stuck peer fails a run instead of hanging it.
const ioTimeout = 15 * time.Second

// maxErrors stops a load run early once a peer is clearly failing.
const maxErrors = 1000

// Result is what one load run measured.
type Result struct {
	Ops     int64         // completed requests (or connections, or streams)
	Errors  int64         // failed requests
	Bytes   int64         // payload bytes received
	Elapsed time.Duration // measured wall time
	// Latencies of the completed requests, sorted; nil for bulk runs.
	Latencies []time.Duration
	FirstErr  error
}

// Rate is Ops per second.
func (r *Result) Rate() float64 { return float64(r.Ops) / r.Elapsed.Seconds() }

// MBps is received payload in MB (10^6 bytes) per second.
func (r *Result) MBps() float64 { return float64(r.Bytes) / 1e6 / r.Elapsed.Seconds() }

// Percentile returns the p-th percentile (0 < p ≤ 100) latency.
func (r *Result) Percentile(p float64) time.Duration {
	if len(r.Latencies) == 0 {
		return 0
	}
	i := int(float64(len(r.Latencies))*p/100+0.5) - 1
	return r.Latencies[max(0, min(i, len(r.Latencies)-1))]
}

// collector gathers per-worker results.
type collector struct {
	mu       sync.Mutex
	ops      int64
	bytes    int64
	lat      []time.Duration
	firstErr error
	errors   atomic.Int64
}

func (c *collector) fail(err error) bool {
	n := c.errors.Add(1)
	c.mu.Lock()
	if c.firstErr == nil {
		c.firstErr = err
	}
	c.mu.Unlock()
	return n < maxErrors
}

func (c *collector) add(ops, bytes int64, lat []time.Duration) {
	c.mu.Lock()
	c.ops += ops
	c.bytes += bytes
	c.lat = append(c.lat, lat...)
	c.mu.Unlock()
}

func (c *collector) result(elapsed time.Duration) *Result {
	slices.Sort(c.lat)
	return &Result{Ops: c.ops, Errors: c.errors.Load(), Bytes: c.bytes, Elapsed: elapsed, Latencies: c.lat, FirstErr: c.firstErr}
}

// payload returns a request of size bytes that varies with seed.
func payload(size, seed int) []byte {
	p := make([]byte, size)
	for i := range p {
		p[i] = Pattern[(i+seed*7919)%patternSize]
	}
	return p
}

func dial(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: ioTimeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c, nil
}

// exchange writes req, reads len(want) bytes into buf and checks they
// equal want.
func exchange(c net.Conn, req, want, buf []byte) error {
	if err := c.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return err
	}
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("write request: %w", err)
	}
	if _, err := io.ReadFull(c, buf[:len(want)]); err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	if !bytes.Equal(want, buf[:len(want)]) {
		return errors.New("response differs from request")
	}
	return nil
}

// pause backs a worker off after an error, so a refusing peer is not
// hammered in a tight loop.
func pause(ctx context.Context) {
	t := time.NewTimer(20 * time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// NewConns opens a new connection per request through addr for d with
// workers concurrent clients: connect, send size bytes, read them back,
// close. Ops counts completed request/response cycles; latencies include
// the connect (and so the proxies' handshake).
func NewConns(ctx context.Context, addr string, workers, size int, d time.Duration) *Result {
	var c collector
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := append([]byte{ModeEcho}, payload(size, w)...)
			resp := make([]byte, size)
			var ops int64
			lat := make([]time.Duration, 0, 4096)
			for ctx.Err() == nil && time.Now().Before(deadline) {
				t0 := time.Now()
				conn, err := dial(ctx, addr)
				if err == nil {
					// req carries the mode byte; the echo is the payload only.
					err = exchange(conn, req, req[1:], resp)
					conn.Close()
				}
				if err != nil {
					if !c.fail(err) {
						break
					}
					pause(ctx)
					continue
				}
				ops++
				lat = append(lat, time.Since(t0))
			}
			c.add(ops, ops*int64(size), lat)
		}()
	}
	wg.Wait()
	return c.result(time.Since(start))
}

// KeptConns opens conns connections through addr, then for d sends size-byte
// requests on each, one outstanding at a time, and reads each echo back.
// Connection setup is not measured.
func KeptConns(ctx context.Context, addr string, conns, size int, d time.Duration) *Result {
	var c collector
	open := make([]net.Conn, 0, conns)
	defer func() {
		for _, cn := range open {
			cn.Close()
		}
	}()
	for range conns {
		cn, err := dial(ctx, addr)
		if err == nil {
			err = exchange(cn, []byte{ModeEcho}, nil, nil)
		}
		if err != nil {
			c.fail(err)
			return c.result(0)
		}
		open = append(open, cn)
	}
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for i, cn := range open {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, resp := payload(size, i), make([]byte, size)
			var ops int64
			lat := make([]time.Duration, 0, 1<<16)
			for ctx.Err() == nil && time.Now().Before(deadline) {
				t0 := time.Now()
				if err := exchange(cn, req, req, resp); err != nil {
					c.fail(err)
					break // the connection is unusable now
				}
				ops++
				lat = append(lat, time.Since(t0))
			}
			c.add(ops, ops*int64(size), lat)
		}()
	}
	wg.Wait()
	return c.result(time.Since(start))
}

// Bulk opens streams connections through addr in ModeDownload and reads
// for d, counting (and, with verify, checking) every byte. Ops counts
// streams that ran to the end.
func Bulk(ctx context.Context, addr string, streams int, d time.Duration, verify bool) *Result {
	return transfers(streams, d, func(deadline time.Time) (int64, error) {
		return download(ctx, addr, deadline, verify)
	})
}

// transfers runs one on streams connections at once until d from now and
// collects their bytes; a transfer that fails counts its bytes but not
// itself.
func transfers(streams int, d time.Duration, one func(deadline time.Time) (int64, error)) *Result {
	var c collector
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := one(deadline)
			if err != nil {
				c.fail(err)
				c.add(0, n, nil)
				return
			}
			c.add(1, n, nil)
		}()
	}
	wg.Wait()
	return c.result(time.Since(start))
}

// openMode dials addr and picks the echo app's mode; the connection is
// closed if ctx ends first, and by done.
func openMode(ctx context.Context, addr string, mode byte) (cn net.Conn, done func(), err error) {
	cn, err = dial(ctx, addr)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(ctx, func() { cn.Close() })
	done = func() {
		stop()
		cn.Close()
	}
	if _, err := cn.Write([]byte{mode}); err != nil {
		done()
		return nil, nil, fmt.Errorf("write mode: %w", err)
	}
	return cn, done, nil
}

func download(ctx context.Context, addr string, deadline time.Time, verify bool) (int64, error) {
	cn, done, err := openMode(ctx, addr, ModeDownload)
	if err != nil {
		return 0, err
	}
	defer done()
	buf := make([]byte, 256<<10)
	var total int64
	for time.Now().Before(deadline) {
		if err := cn.SetReadDeadline(time.Now().Add(ioTimeout)); err != nil {
			return total, err
		}
		n, err := cn.Read(buf)
		if verify && n > 0 && !matchesPattern(buf[:n], total) {
			return total, fmt.Errorf("download: bytes differ from the pattern near offset %d", total)
		}
		total += int64(n)
		if err != nil {
			return total, fmt.Errorf("download after %d bytes: %w", total, err)
		}
	}
	return total, nil
}

// Upload opens streams connections through addr in ModeUpload (with
// verify, ModeUploadChecked), writes Pattern on each for d, half-closes it
// and waits for the app's count of what it received, which must be every
// byte sent. Bytes counts what the app confirmed; the elapsed time runs
// until the last count arrives, so data still in flight at d counts only
// once it is through. Ops counts uploads confirmed whole.
func Upload(ctx context.Context, addr string, streams int, d time.Duration, verify bool) *Result {
	return transfers(streams, d, func(deadline time.Time) (int64, error) {
		return upload(ctx, addr, deadline, verify)
	})
}

// upload is one connection of Upload: the bytes the app confirmed.
func upload(ctx context.Context, addr string, deadline time.Time, verify bool) (int64, error) {
	mode := ModeUpload
	if verify {
		mode = ModeUploadChecked
	}
	cn, done, err := openMode(ctx, addr, mode)
	if err != nil {
		return 0, err
	}
	defer done()
	cw, ok := cn.(interface{ CloseWrite() error })
	if !ok {
		return 0, fmt.Errorf("upload: %T cannot half-close", cn)
	}
	var sent int64
	for time.Now().Before(deadline) {
		if err := cn.SetWriteDeadline(time.Now().Add(ioTimeout)); err != nil {
			return 0, err
		}
		n, err := cn.Write(Pattern)
		sent += int64(n)
		if err != nil {
			return 0, fmt.Errorf("upload after %d bytes: %w", sent, err)
		}
	}
	if err := cw.CloseWrite(); err != nil {
		return 0, fmt.Errorf("upload: half-close after %d bytes: %w", sent, err)
	}
	if err := cn.SetReadDeadline(time.Now().Add(ioTimeout)); err != nil {
		return 0, err
	}
	var count [8]byte
	if _, err := io.ReadFull(cn, count[:]); err != nil {
		return 0, fmt.Errorf("upload of %d bytes: no count from the app (a byte differed, the end never reached it, or the connection broke): %w", sent, err)
	}
	got := int64(binary.BigEndian.Uint64(count[:]))
	if got != sent {
		return min(got, sent), fmt.Errorf("upload: the app received %d of the %d bytes sent", got, sent)
	}
	return got, nil
}

// matchesPattern reports whether b is the stream of Pattern blocks at off.
func matchesPattern(b []byte, off int64) bool {
	for len(b) > 0 {
		i := int(off % patternSize)
		n := min(len(b), patternSize-i)
		if !bytes.Equal(b[:n], Pattern[i:i+n]) {
			return false
		}
		b, off = b[n:], off+int64(n)
	}
	return true
}

// Held is a set of open, idle connections through a pair.
type Held struct {
	conns []net.Conn
}

// Len is the number of connections held.
func (h *Held) Len() int { return len(h.conns) }

// Close closes every held connection.
func (h *Held) Close() {
	for _, c := range h.conns {
		c.Close()
	}
	h.conns = nil
}

// HoldIdle opens n connections through addr, checks each end to end with a
// small echo (so both proxies and the app hold their side), and leaves them
// open and idle. On error the connections opened so far are closed.
func HoldIdle(ctx context.Context, addr string, n int) (*Held, error) {
	const parallel = 16
	h := &Held{conns: make([]net.Conn, n)}
	var (
		wg       sync.WaitGroup
		next     atomic.Int64
		mu       sync.Mutex
		firstErr error
	)
	for range min(parallel, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := append([]byte{ModeEcho}, payload(16, 0)...)
			resp := make([]byte, 16)
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				cn, err := dial(ctx, addr)
				if err == nil {
					err = exchange(cn, req, req[1:], resp)
					if err == nil {
						err = cn.SetDeadline(time.Time{})
					}
					if err != nil {
						cn.Close()
					}
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("connection %d: %w", i, err)
					}
					mu.Unlock()
					return
				}
				h.conns[i] = cn
			}
		}()
	}
	wg.Wait()
	h.conns = slices.DeleteFunc(h.conns, func(c net.Conn) bool { return c == nil })
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		h.Close()
		return nil, firstErr
	}
	return h, nil
}

// VerifyEcho sends n pseudo-random bytes through addr in ModeEcho while
// reading the echo concurrently, and checks every byte came back in order.
func VerifyEcho(ctx context.Context, addr string, n int) error {
	cn, err := dial(ctx, addr)
	if err != nil {
		return err
	}
	defer cn.Close()
	stop := context.AfterFunc(ctx, func() { cn.Close() })
	defer stop()
	if err := cn.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return err
	}
	data := payload(n, 12345)
	werr := make(chan error, 1)
	go func() {
		_, err := cn.Write(append([]byte{ModeEcho}, data...))
		werr <- err
	}()
	got := make([]byte, n)
	_, rerr := io.ReadFull(cn, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("echo %d bytes: write: %w", n, err)
	}
	if rerr != nil {
		return fmt.Errorf("echo %d bytes: read: %w", n, rerr)
	}
	if i := firstDiff(data, got); i >= 0 {
		return fmt.Errorf("echo %d bytes: byte %d differs", n, i)
	}
	return nil
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
