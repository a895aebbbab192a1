// Package rawsock reads and writes sockets with raw system calls, outside
// the Go scheduler's system-call state.
//
// Go's net package brackets every read(2) and write(2) with entersyscall
// and exitsyscall. When every processor of the program was idle, the
// runtime's monitor thread (sysmon) sleeps deeply, and entersyscall wakes
// it: it then polls every 20 µs for at least a millisecond before it backs
// off. A sidecar goes idle and busy again between most requests, so every
// burst paid for that wake-up and fifty more — on a virtual machine each
// is a context switch costing tens of microseconds (bench/RESULTS.md).
// The data path's sockets are non-blocking, so their reads and writes
// never block in the kernel and need no scheduler bookkeeping; waiting for
// readiness still goes through the runtime's poller (syscall.RawConn), so
// deadlines and Close work as with net.Conn.
package rawsock

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Conn reads and writes a socket with raw system calls. Read and Write
// may run concurrently with each other, and each is safe for concurrent
// use (a Write is never interleaved with another).
//
// Bulk data goes through net.Conn's system calls instead: a read after one
// that filled its buffer, a read once bulkStreak bytes came in without the
// socket ever running dry, and a write of bulkWrite bytes or more. A raw
// system call never lets the scheduler in, and a goroutine that moves bulk
// data without ever waiting would hold its processor while other
// connections' goroutines wait for the network poller: with one processor,
// requests beside a per-connection download waited seconds. Go's own
// system calls wake the runtime's monitor, which preempts a goroutine that
// runs on and polls the network for the others; bulk data pays little for
// them per byte.
type Conn struct {
	nc   net.Conn
	r, w half
	now  func(fd uintptr) bool // one read that never waits (ReadNow's), bound once

	full   atomic.Bool  // the last Read filled its buffer
	streak atomic.Int64 // bytes read since a Read last waited for data
}

// bulkWrite is the size from which a Write goes through net.Conn.
const bulkWrite = 32 << 10

// bulkStreak is how much a Conn reads without waiting for data before a
// read goes through net.Conn (and the count starts again).
const bulkStreak = 256 << 10

// half is one direction's call in progress, kept here (and its callback
// bound once) so that a Read or Write allocates nothing.
type half struct {
	mu   sync.Mutex
	wait func(func(fd uintptr) bool) error // the RawConn's Read or Write
	f    func(fd uintptr) bool             // one attempt: false to wait for readiness
	p    []byte
	n    int
	err  error // the system call's
	runs int   // calls of f in this do: more than one means it waited
}

// do runs h.f over p until it is done, waiting for readiness in between.
// err is the RawConn's (closed, deadline: already a *net.OpError), serr
// the system call's; waited reports that it waited.
func (h *half) do(p []byte) (n int, err, serr error, waited bool) {
	return h.doWith(h.f, p)
}

// doWith is do with attempt f instead of h.f.
func (h *half) doWith(f func(fd uintptr) bool, p []byte) (n int, err, serr error, waited bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.p, h.n, h.err, h.runs = p, 0, nil, 0
	err = h.wait(f)
	n, serr, waited = h.n, h.err, h.runs > 1
	h.p, h.err = nil, nil
	return n, err, serr, waited
}

// Wrap returns a Conn for a TCP or Unix socket, and c itself for anything
// else (a TLS connection, a wrapper that buffers): only a plain socket's
// bytes may bypass its own Read and Write.
func Wrap(c net.Conn) io.ReadWriter {
	switch c.(type) {
	case *net.TCPConn, *net.UnixConn:
	default:
		return c
	}
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return c
	}
	k := &Conn{nc: c}
	k.r.wait, k.r.f = rc.Read, k.readOnce
	k.now = k.readNow
	k.w.wait, k.w.f = rc.Write, k.writeAll
	return k
}

// Read reads what the socket has, waiting for it as net.Conn's Read does;
// io.EOF once the peer closed its direction.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.full.Load() || c.streak.Load() >= bulkStreak {
		n, err := c.nc.Read(p)
		c.full.Store(err == nil && n == len(p))
		c.streak.Store(0)
		return n, err
	}
	n, err, serr, waited := c.r.do(p)
	c.full.Store(err == nil && serr == nil && n == len(p))
	if waited {
		c.streak.Store(int64(n))
	} else {
		c.streak.Add(int64(n))
	}
	switch {
	case err != nil:
		return 0, err
	case serr != nil:
		return 0, c.opError("read", serr)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// ErrWouldBlock is ReadNow's error when the socket holds nothing to read.
// It is a net.Error whose Timeout and Temporary are true: crypto/tls
// passes such an error on without failing the connection, and keeps a
// partial record it read for the next Read.
var ErrWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "rawsock: nothing to read now" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

// ReadNow reads what the socket holds now, without waiting for more:
// ErrWouldBlock when it holds nothing, io.EOF once the peer closed its
// direction.
func (c *Conn) ReadNow(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err, serr, _ := c.r.doWith(c.now, p)
	switch {
	case err != nil:
		return 0, err
	case errors.Is(serr, syscall.EAGAIN):
		return 0, ErrWouldBlock
	case serr != nil:
		return 0, c.opError("read", serr)
	case n == 0:
		return 0, io.EOF
	}
	c.streak.Add(int64(n))
	return n, nil
}

// ReadNow reads from r what needs no wait: through r's own ReadNow (a
// Conn's, or a wrapper's that has one), else nothing — ErrWouldBlock, as
// when the socket holds nothing.
func ReadNow(r io.Reader, p []byte) (int, error) {
	if rn, ok := r.(interface{ ReadNow([]byte) (int, error) }); ok {
		return rn.ReadNow(p)
	}
	return 0, ErrWouldBlock
}

// readNow is one read(2), never waiting.
func (c *Conn) readNow(fd uintptr) bool {
	c.r.n, c.r.err = ReadOnce(fd, c.r.p)
	return true
}

// readOnce is one read(2); false (wait for readability) on EAGAIN.
func (c *Conn) readOnce(fd uintptr) bool {
	c.r.runs++
	c.r.n, c.r.err = ReadOnce(fd, c.r.p)
	return !errors.Is(c.r.err, syscall.EAGAIN)
}

// Write writes all of p, waiting for room as net.Conn's Write does.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(p) >= bulkWrite {
		return c.nc.Write(p)
	}
	n, err, serr, _ := c.w.do(p)
	switch {
	case err != nil:
		return n, err
	case serr != nil:
		return n, c.opError("write", serr)
	}
	return n, nil
}

// writeAll writes what is left of c.w.p; false (wait for room) on EAGAIN.
func (c *Conn) writeAll(fd uintptr) bool {
	for c.w.n < len(c.w.p) {
		n, err := WriteOnce(fd, c.w.p[c.w.n:])
		if errors.Is(err, syscall.EAGAIN) {
			return false
		}
		if err != nil {
			c.w.err = err
			return true
		}
		c.w.n += n
	}
	return true
}

func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.nc.LocalAddr().Network(), Source: c.nc.LocalAddr(), Addr: c.nc.RemoteAddr(),
		Err: os.NewSyscallError(op, err)}
}

// ReadOnce is one read(2) of fd into p (EINTR retried), outside the
// scheduler's system-call state: fd must be non-blocking.
func ReadOnce(fd uintptr, p []byte) (int, error) {
	return rw(syscall.SYS_READ, fd, p)
}

// WriteOnce is one write(2) of p to fd (EINTR retried), outside the
// scheduler's system-call state: fd must be non-blocking.
func WriteOnce(fd uintptr, p []byte) (int, error) {
	return rw(syscall.SYS_WRITE, fd, p)
}

func rw(trap, fd uintptr, p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		r, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case 0:
			return int(r), nil
		case syscall.EINTR:
			continue
		default:
			return 0, e
		}
	}
}
