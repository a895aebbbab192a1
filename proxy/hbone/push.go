package hbone

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/meshproxy/meshproxy/internal/rawsock"
	"golang.org/x/sys/unix"
)

// Pushing: the forwarder of a stream's receive direction does not read
// the stream (which would cost a goroutine hand-off per message: the
// connection's reader wakes the forwarder, the forwarder writes to the
// app). Instead the reader writes a DATA frame's payload straight to the
// app socket, without waiting, when nothing of the stream is queued and no
// write to it is in progress. What the socket does not take at once is
// queued in the stream's buffer, as when nothing pushes, and the
// forwarder's goroutine writes it, waiting as long as the app needs: a
// slow app never stalls the reader, so never the other streams of the
// connection. The stream window is returned as bytes reach the app, as
// with Read, and END_STREAM ends the forwarder (which then half-closes the
// app) only after every byte before it is written.

// sink is where a pushing stream's data goes.
type sink struct {
	dst   net.Conn
	raw   syscall.RawConn // for writes that never wait; nil: the forwarder writes everything
	count func(int64)

	// The write in progress (the reader's only), kept here so that a
	// write allocates nothing.
	p      []byte
	vec    [][]byte
	iov    [][]byte // the reader's flushBuffered vector, made on its first flush (a held connection never has one)
	n      int
	err    error
	write  func(fd uintptr) bool // k.writeOnce, bound once
	writev func(fd uintptr) bool // k.writevOnce, bound once
}

// tryWrite writes what of p the socket takes now, without waiting.
func (k *sink) tryWrite(p []byte) (int, error) {
	k.p = p
	return k.try(k.write)
}

// tryWritev writes what of bufs the socket takes now, in one writev(2),
// without waiting.
func (k *sink) tryWritev(bufs [][]byte) (int, error) {
	k.vec = bufs
	return k.try(k.writev)
}

// try makes write attempt f (which never waits) on the socket, counts what
// it wrote and returns it; the socket being full is no error.
func (k *sink) try(f func(fd uintptr) bool) (int, error) {
	k.n, k.err = 0, nil
	cerr := k.raw.Write(f)
	n, err := max(k.n, 0), k.err
	k.p, k.vec, k.err = nil, nil, nil
	switch {
	case errors.Is(err, syscall.EAGAIN):
		err = nil
	case err == nil:
		err = cerr
	}
	if n > 0 {
		k.count(int64(n))
	}
	return n, err
}

// writevOnce is one writev(2) of k.vec on fd; it never waits.
func (k *sink) writevOnce(fd uintptr) bool {
	for {
		k.n, k.err = unix.Writev(int(fd), k.vec)
		if !errors.Is(k.err, syscall.EINTR) {
			return true
		}
	}
}

// writeOnce is one write(2) of k.p on fd; it never waits for the socket.
func (k *sink) writeOnce(fd uintptr) bool {
	for {
		k.n, k.err = rawsock.WriteOnce(fd, k.p)
		if !errors.Is(k.err, syscall.EINTR) {
			return true // done, whatever the outcome
		}
	}
}

// PushTo writes what the peer sends to dst as it arrives, calling count
// with each write's byte count, until the peer ends its direction (nil;
// the caller half-closes dst) or the stream fails. It implements
// forward.Pusher; a stream is either read or pushed, not both.
func (s *Stream) PushTo(dst net.Conn, count func(int64)) error {
	c := s.c
	k := &sink{dst: dst, count: count}
	k.write, k.writev = k.writeOnce, k.writevOnce
	switch sc := dst.(type) {
	case *net.TCPConn, *net.UnixConn: // plain sockets only: a wrapper may buffer or transform what it writes
		if raw, err := sc.(syscall.Conn).SyscallConn(); err == nil {
			k.raw = raw
		}
	}
	var (
		taken []chunk
		vec   net.Buffers
	)
	c.mu.Lock()
	s.sink = k
	defer func() {
		s.sink = nil
		c.mu.Unlock()
	}()
	for {
		switch {
		case s.rstErr != nil:
			return s.rstErr
		case s.sinkErr != nil:
			return s.sinkErr
		case s.buffered() && !s.sinkBusy:
			// Take everything queued and write it in one writev.
			taken = append(taken[:0], s.recv...)
			vec = appendChunks(vec[:0], taken, s.off)
			clear(s.recv)
			s.recv, s.off = s.recv[:0], 0 // copied to taken: the slice is free
			s.sinkBusy = true
			c.mu.Unlock()
			n, err := vec.WriteTo(dst)
			count(n)
			for i := range taken {
				chunks.Put(taken[i].a)
				taken[i] = chunk{}
			}
			c.mu.Lock()
			s.sinkBusy = false
			if err != nil {
				return fmt.Errorf("write to %s: %w", dst.RemoteAddr(), err)
			}
			if inc := s.consumed(int(n)); inc > 0 {
				c.mu.Unlock()
				s.returnWindow(inc)
				c.mu.Lock()
			}
		case s.buffered() || s.sinkBusy && s.err == nil:
			s.rcond.Wait() // the reader is writing; it signals if it leaves something, or the stream ended
		case s.recvEnd:
			return nil
		case s.err != nil:
			return s.err
		default:
			s.rcond.Wait()
		}
	}
}

// push writes data from the peer straight to the sink, if the stream has
// one, nothing of it is queued and no write is in progress; rest is what
// the socket did not take (to be queued), inc the window to return. Called
// by the reader with c.mu held, which it releases during the write.
func (s *Stream) push(data []byte) (rest []byte, inc uint32) {
	k := s.sink
	if k == nil || k.raw == nil || s.sinkBusy || s.buffered() || s.sinkErr != nil || len(data) == 0 || len(data) == maxFrame {
		// A full frame is likely part of a bulk transfer: the forwarder
		// writes such runs of frames in one writev, while the reader
		// decrypts the next.
		return data, 0
	}
	s.sinkBusy = true
	s.c.mu.Unlock()
	n, err := k.tryWrite(data)
	s.c.mu.Lock()
	s.sinkBusy = false
	if err != nil {
		s.sinkErr = fmt.Errorf("write to %s: %w", k.dst.RemoteAddr(), err)
		return nil, 0
	}
	return data[n:], s.consumed(n)
}

// flushBuffered writes what s has buffered to its sink from the reader's
// goroutine, without waiting — the bytes the reader just decrypted go out
// from the core that holds them, in one writev — and leaves what the socket
// does not take to the forwarder, which it wakes. Called by the reader with
// c.mu held, which it releases during the write.
func (s *Stream) flushBuffered() {
	k := s.sink
	if k == nil || k.raw == nil || s.sinkBusy || !s.buffered() || s.sinkErr != nil || s.rstErr != nil {
		if s.buffered() {
			s.rcond.Signal()
		}
		return
	}
	// Take the chunks, as PushTo does: a reset while mu is released must
	// not return them to the pool under the write.
	taken, off := s.recv, s.off
	all := taken
	s.recv, s.off = nil, 0
	if k.iov == nil {
		k.iov = make([][]byte, 0, maxFlushChunks)
	}
	iov := appendChunks(k.iov[:0], taken[:min(len(taken), maxFlushChunks)], off)
	s.sinkBusy = true // the forwarder keeps off k.iov
	s.c.mu.Unlock()
	if flushWriteHook != nil {
		flushWriteHook()
	}
	n, err := k.tryWritev(iov)
	s.c.mu.Lock()
	clear(iov)
	s.sinkBusy = false
	left := n
	for len(taken) > 0 {
		avail := taken[0].n - off
		if left < avail {
			off += left
			break
		}
		left -= avail
		chunks.Put(taken[0].a)
		taken, off = taken[1:], 0
	}
	switch {
	case len(taken) == 0:
		if s.recv == nil && !s.released {
			clear(all)
			s.recv = all[:0] // the next frames reuse the slice
		}
	case s.rstErr != nil || s.released: // dropped while it wrote
		for _, ch := range taken {
			chunks.Put(ch.a)
		}
	default:
		s.recv, s.off = taken, off // only the reader adds to s.recv, and it is here
	}
	if err != nil {
		s.sinkErr = fmt.Errorf("write to %s: %w", k.dst.RemoteAddr(), err)
		s.rcond.Signal()
		return
	}
	if inc := s.consumed(n); inc > 0 {
		s.c.mu.Unlock()
		s.returnWindow(inc)
		s.c.mu.Lock()
	}
	if s.buffered() || s.recvEnd || s.err != nil || s.rstErr != nil {
		// The socket is full and the forwarder is to wait for it; or the
		// forwarder, woken by the stream's end (or failure), found us
		// writing and waits for us, and nothing we leave would wake it.
		s.rcond.Signal()
	}
}

// flushWriteHook, if set (by tests only), runs as flushBuffered starts its
// write, with mu released: the moment the forwarder may find the reader
// writing.
var flushWriteHook func()

// appendChunks appends the buffered bytes of cs to vec, the first chunk's
// from off on.
func appendChunks(vec [][]byte, cs []chunk, off int) [][]byte {
	for i, ch := range cs {
		if i > 0 {
			off = 0
		}
		vec = append(vec, ch.a[off:ch.n])
	}
	return vec
}

// maxFlushChunks bounds one flushBuffered writev (the batch a reader
// defers, and some).
const maxFlushChunks = 2 * flushBatch / maxFrame
