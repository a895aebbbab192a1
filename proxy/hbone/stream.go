package hbone

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// maxWriteChunk is how much of one Write is framed per window check, so a
// large Write does not hold the write buffer for long: the forwarder's
// bulk buffer, so each of its reads is one flush, corked into one write to
// the socket (see Conn.write).
const maxWriteChunk = 512 << 10

// A stream buffers what the peer sent in chunks of one frame's size, taken
// from a pool: a reader that lags holds a queue of them (bounded by the
// window) and nothing is copied to grow a buffer.
type chunk struct {
	a *[maxFrame]byte
	n int
}

var chunks = sync.Pool{New: func() any { return new([maxFrame]byte) }}

// Stream is one CONNECT stream: a net.Conn whose Read returns what the peer
// sends and whose Write sends; CloseWrite ends our direction (END_STREAM)
// while the other keeps flowing, and Close resets (RST_STREAM) a stream
// that did not end cleanly both ways. Deadlines are not supported (the
// forwarder aborts with Close).
type Stream struct {
	c         *Conn
	id        uint32
	method    string // server: the request's :method
	authority string // server: the request's :authority
	respDone  chan struct{}

	// Guarded by c.mu.
	rcond, wcond *sync.Cond
	sendWindow   int64
	recvWindow   int64
	unacked      int64   // read by the app, not yet returned to the peer
	window       int64   // recvWindow + buffered + unacked: StreamWindow, or MaxStreamWindow once grown
	recv         []chunk // what the peer sent, not read yet
	off          int     // read offset in recv[0]
	recvEnd      bool    // the peer ended its direction
	sendEnd      bool    // we ended ours
	status       int     // client: the answer's status
	respClosed   bool
	responded    bool   // server: answered
	failStatus   int    // server: the answer if closed unanswered
	failReason   string // server: sent with a refusal (DecisionHeader); client: the one received
	err          error
	rstErr       error // reset either way: reads and writes fail at once
	released     bool
	sink         *sink // set while PushTo runs: where the stream's data goes
	sinkBusy     bool  // a write to the sink is in progress (reader or PushTo)
	sinkErr      error // a write to the sink by the reader failed
	flushPending bool  // buffered bulk data the reader is to flush (see flushBatch)

	rstSent bool // guarded by c.wmu: no frame follows our RST_STREAM

	// bulk: the stream has written a chunk of at least bulkChunk; from
	// then on all its frames go to the connection's bulk queue (sticky,
	// so they keep their order).
	bulk atomic.Bool
}

// bulkChunk is the Write size that makes a stream bulk: a copy loop
// that fills its 32 KiB buffer is streaming.
const bulkChunk = 32 << 10

func (c *Conn) newStream(id uint32) *Stream {
	s := &Stream{c: c, id: id, recvWindow: int64(c.opts.StreamWindow), window: int64(c.opts.StreamWindow), respDone: make(chan struct{}),
		failStatus: http.StatusServiceUnavailable}
	s.rcond = sync.NewCond(&c.mu)
	s.wcond = sync.NewCond(&c.mu)
	return s
}

// ID is the stream's HTTP/2 stream identifier.
func (s *Stream) ID() uint32 { return s.id }

// Method is the request's :method (server side).
func (s *Stream) Method() string { return s.method }

// Authority is the request's :authority (server side): for CONNECT, the
// address the client wants to reach.
func (s *Stream) Authority() string { return s.authority }

// Status is the server's answer (client side): 200 opens the tunnel.
func (s *Stream) Status() int {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.status
}

// SetFailStatus sets the answer sent if the stream is closed before
// Respond (server side; default 503).
func (s *Stream) SetFailStatus(code int) {
	s.c.mu.Lock()
	s.failStatus = code
	s.c.mu.Unlock()
}

// SetFailReason sets why the stream is refused, sent in DecisionHeader
// with any answer but 200 (server side; default none).
func (s *Stream) SetFailReason(reason string) {
	s.c.mu.Lock()
	s.failReason = reason
	s.c.mu.Unlock()
}

// FailReason is the DecisionHeader of the server's answer, if any (client
// side): why it refused the stream.
func (s *Stream) FailReason() string {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.failReason
}

// Respond answers the request (server side): 200 opens the tunnel, any
// other status refuses it and ends the stream.
func (s *Stream) Respond(status int) error {
	c := s.c
	c.mu.Lock()
	switch {
	case s.responded:
		c.mu.Unlock()
		return errors.New("hbone stream already answered")
	case s.rstErr != nil:
		err := s.rstErr
		c.mu.Unlock()
		return err
	case s.err != nil:
		err := s.err
		c.mu.Unlock()
		return err
	}
	s.responded = true
	end := status != http.StatusOK
	if end {
		s.sendEnd = true
	}
	stop := end && !s.recvEnd
	reason := s.failReason
	c.mu.Unlock()
	return c.queue(true, func(b []byte) []byte { return s.appendAnswer(b, status, reason, end, stop) })
}

// appendAnswer appends the response HEADERS (with end, END_STREAM) and,
// with stop, RST_STREAM(NO_ERROR): the client need not send the rest of a
// refused request. Called with wmu held.
func (s *Stream) appendAnswer(b []byte, status int, reason string, end, stop bool) []byte {
	if s.rstSent {
		return b
	}
	c := s.c
	c.hbuf.Reset()
	_ = c.henc.WriteField(hpack.HeaderField{Name: ":status", Value: strconv.Itoa(status)})
	if reason != "" && status != http.StatusOK {
		_ = c.henc.WriteField(hpack.HeaderField{Name: DecisionHeader, Value: reason})
	}
	b = appendHeaders(b, s.id, c.hbuf.Bytes(), end)
	if stop {
		b = s.appendRST(b, http2.ErrCodeNo)
	}
	return b
}

// appendRST appends our RST_STREAM, once. Called with wmu held.
func (s *Stream) appendRST(b []byte, code http2.ErrCode) []byte {
	if s.rstSent {
		return b
	}
	s.rstSent = true
	return appendRST(b, s.id, code)
}

// respond wakes Open. Called with c.mu held.
func (s *Stream) respond() {
	if !s.respClosed {
		s.respClosed = true
		close(s.respDone)
	}
}

// wake wakes everything waiting on the stream. Called with c.mu held.
func (s *Stream) wake() {
	s.rcond.Broadcast()
	s.wcond.Broadcast()
	s.respond()
}

// peerReset handles the peer's RST_STREAM. Called with c.mu held.
func (s *Stream) peerReset(code http2.ErrCode) {
	switch code {
	case http2.ErrCodeNo:
		// Stop sending; what the peer sent still reads to its end.
		if s.err == nil {
			s.err = &ResetError{Code: code}
		}
		s.sendEnd = true
	case http2.ErrCodeRefusedStream:
		s.rstErr = ErrRefused
	default:
		s.rstErr = &ResetError{Code: code}
	}
	if s.rstErr != nil {
		s.dropBuf()
	}
	s.wake()
}

// resetLocal marks the stream reset by us; the caller queues the frame.
// Called with c.mu held.
func (s *Stream) resetLocal(code http2.ErrCode) {
	if s.rstErr == nil {
		s.rstErr = fmt.Errorf("hbone stream reset: %s", code)
	}
	s.dropBuf()
	s.wake()
}

// deliver buffers data from the peer. Called with c.mu held.
func (s *Stream) deliver(data []byte) {
	for len(data) > 0 {
		if k := len(s.recv) - 1; k >= 0 && s.recv[k].n < maxFrame {
			last := &s.recv[k]
			n := copy(last.a[last.n:], data)
			last.n += n
			data = data[n:]
			continue
		}
		s.recv = append(s.recv, chunk{a: chunks.Get().(*[maxFrame]byte)})
	}
}

// buffered reports whether data waits to be read. Called with c.mu held.
func (s *Stream) buffered() bool { return len(s.recv) > 0 }

// readBuffered copies buffered data into p. Called with c.mu held.
func (s *Stream) readBuffered(p []byte) int {
	n := 0
	for n < len(p) && len(s.recv) > 0 {
		c := &s.recv[0]
		m := copy(p[n:], c.a[s.off:c.n])
		n += m
		s.off += m
		if s.off == c.n {
			chunks.Put(c.a)
			s.recv[0] = chunk{}
			s.recv, s.off = s.recv[1:], 0
		}
	}
	if len(s.recv) == 0 {
		s.recv = nil
	}
	return n
}

// dropBuf returns the buffered chunks. Called with c.mu held.
func (s *Stream) dropBuf() {
	for _, c := range s.recv {
		chunks.Put(c.a)
	}
	s.recv, s.off = nil, 0
}

// Read reads what the peer sent; io.EOF once it ended its direction.
func (s *Stream) Read(p []byte) (int, error) {
	c := s.c
	c.mu.Lock()
	for {
		if s.rstErr != nil {
			err := s.rstErr
			c.mu.Unlock()
			return 0, err
		}
		if s.buffered() {
			break
		}
		if s.recvEnd {
			c.mu.Unlock()
			return 0, io.EOF
		}
		if s.err != nil {
			err := s.err
			c.mu.Unlock()
			return 0, err
		}
		s.rcond.Wait()
	}
	n := s.readBuffered(p)
	inc := s.consumed(n)
	c.mu.Unlock()
	s.returnWindow(inc)
	return n, nil
}

// consumed accounts for n bytes the app took (read, or written to the
// sink): the window to return to the peer now, if any. Called with c.mu
// held.
//
// What the peer may have in flight plus what we buffer is the window less
// unacked. A stream alone on the connection is refilled to its whole
// window, and the first refill grows that window to MaxStreamWindow (so a
// request, which never reads a quarter of StreamWindow, never gets more
// than StreamWindow); a stream sharing the connection is kept to half of
// StreamWindow, grown or not.
func (s *Stream) consumed(n int) (inc uint32) {
	s.unacked += int64(n)
	if s.recvEnd {
		return 0
	}
	alone := s.c.active <= 1
	target := s.window
	if !alone {
		target = int64(s.c.opts.StreamWindow) / 2
	}
	give := s.unacked - (s.window - target)
	if give < target/4 {
		return 0
	}
	s.recvWindow += give
	s.unacked -= give
	if grow := int64(s.c.opts.MaxStreamWindow) - s.window; alone && grow > 0 {
		s.window += grow
		s.recvWindow += grow
		give += grow
	}
	return uint32(give)
}

// returnWindow sends WINDOW_UPDATE for inc bytes, if any.
func (s *Stream) returnWindow(inc uint32) {
	if inc == 0 {
		return
	}
	_ = s.c.queue(false, func(b []byte) []byte {
		if s.rstSent {
			return b
		}
		return appendWindowUpdate(b, s.id, inc)
	})
}

// sendErr is why nothing more can be sent, if so. Called with c.mu held.
func (s *Stream) sendErr() error {
	switch {
	case s.rstErr != nil:
		return s.rstErr
	case s.err != nil:
		return s.err
	case s.sendEnd:
		return fmt.Errorf("hbone stream %d: write after end of stream: %w", s.id, net.ErrClosed)
	}
	return nil
}

// dataFrames builds p as s's DATA frames of at most max bytes each (END_STREAM
// on the last with end) into a write queue; nothing once s's RST_STREAM is
// queued, which no frame of s may follow.
func (s *Stream) dataFrames(p []byte, end bool, max int) func([]byte) []byte {
	return func(b []byte) []byte {
		if s.rstSent {
			return b
		}
		return appendData(b, s.id, p, end, max)
	}
}

// Write sends p, waiting for flow-control window as needed.
func (s *Stream) Write(p []byte) (int, error) {
	c := s.c
	total := 0
	for len(p) > 0 {
		c.mu.Lock()
		for s.sendErr() == nil && (s.sendWindow <= 0 || c.sendWindow <= 0) {
			s.wcond.Wait()
		}
		if err := s.sendErr(); err != nil {
			c.mu.Unlock()
			return total, err
		}
		n := int(min(int64(len(p)), s.sendWindow, c.sendWindow, maxWriteChunk))
		s.sendWindow -= int64(n)
		c.sendWindow -= int64(n)
		whole := n >= bulkChunk && n <= c.peerMaxFrame // one frame, not copied (leadData)
		c.mu.Unlock()
		chunk := p[:n]
		if n >= bulkChunk && !s.bulk.Load() {
			s.bulk.Store(true)
		}
		var err error
		if whole {
			err = c.leadData(s, chunk)
		} else {
			err = c.queueData(s.bulk.Load(), s.dataFrames(chunk, false, maxFrame))
		}
		if err != nil {
			return total, err
		}
		total += n
		p = p[n:]
	}
	return total, nil
}

// CloseWrite ends our direction (END_STREAM); the peer's keeps flowing.
func (s *Stream) CloseWrite() error {
	c := s.c
	c.mu.Lock()
	if err := s.sendErr(); err != nil {
		c.mu.Unlock()
		return err
	}
	s.sendEnd = true
	c.mu.Unlock()
	return c.queueFor(s, true, s.dataFrames(nil, true, maxFrame))
}

// Close releases the stream. A server stream not yet answered is answered
// with its fail status; a stream that did not end cleanly both ways is
// reset (RST_STREAM CANCEL), so the peer never mistakes an abort for an
// end of stream. Blocked reads and writes return.
func (s *Stream) Close() error {
	c := s.c
	c.mu.Lock()
	if s.released {
		c.mu.Unlock()
		return nil
	}
	s.released = true
	answer := c.server && !s.responded && s.rstErr == nil && s.err == nil
	status, reason, stop := s.failStatus, s.failReason, !s.recvEnd
	var rst http2.ErrCode
	reset := false
	switch {
	case answer:
		s.responded = true
	case s.rstErr != nil, s.sendEnd && s.recvEnd:
	default:
		reset, rst = true, http2.ErrCodeCancel
	}
	if s.err == nil {
		s.err = net.ErrClosed
	}
	s.dropBuf()
	delete(c.streams, s.id)
	drained := c.release()
	s.wake()
	c.mu.Unlock()
	if answer || reset {
		_ = c.queueFor(s, false, func(b []byte) []byte {
			if answer {
				return s.appendAnswer(b, status, reason, true, stop)
			}
			return s.appendRST(b, rst)
		})
	}
	if drained {
		c.closeAfterFlush()
	}
	return nil
}

// LocalAddr is the local address of the connection carrying the stream.
func (s *Stream) LocalAddr() net.Addr { return s.c.nc.LocalAddr() }

// RemoteAddr is the peer address of the connection carrying the stream.
func (s *Stream) RemoteAddr() net.Addr { return s.c.nc.RemoteAddr() }

// SetDeadline is not supported; it returns nil so callers that set one
// defensively keep working.
func (s *Stream) SetDeadline(time.Time) error { return nil }

// SetReadDeadline is not supported (see SetDeadline).
func (s *Stream) SetReadDeadline(time.Time) error { return nil }

// SetWriteDeadline is not supported (see SetDeadline).
func (s *Stream) SetWriteDeadline(time.Time) error { return nil }
