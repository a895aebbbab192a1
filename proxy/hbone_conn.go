package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// hboneServerStream is one inbound CONNECT stream as a net.Conn: reads
// come from the request body, writes go to the response. The HTTP handler
// goroutine owns the response until finish; Close and CloseWrite only
// signal it, so no call here blocks on the network on behalf of another
// goroutine.
type hboneServerStream struct {
	w          http.ResponseWriter
	rc         *http.ResponseController
	body       io.ReadCloser
	local      net.Addr
	remote     net.Addr
	failStatus atomic.Int32 // the status to answer if the stream is closed before accept
	committed  atomic.Bool  // 200 sent
	readEOF    atomic.Bool

	writeDone chan struct{} // closed by CloseWrite
	writeOnce sync.Once

	mu          sync.Mutex
	handlerDone bool // the handler returned: w must not be touched
	closed      bool
}

func newHBONEServerStream(w http.ResponseWriter, r *http.Request, c net.Conn) *hboneServerStream {
	s := &hboneServerStream{w: w, rc: http.NewResponseController(w), body: r.Body,
		local: c.LocalAddr(), remote: c.RemoteAddr(), writeDone: make(chan struct{})}
	s.failStatus.Store(http.StatusServiceUnavailable)
	return s
}

func (s *hboneServerStream) setFailStatus(code int) { s.failStatus.Store(int32(code)) }

// accept answers 200: the tunnel is open.
func (s *hboneServerStream) accept() error {
	s.committed.Store(true)
	s.w.WriteHeader(http.StatusOK)
	return s.rc.Flush()
}

// finish is the handler's last word: if nothing was answered yet, answer
// status (or the fail status set by the refusal path when status is 0).
func (s *hboneServerStream) finish(status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.committed.Load() {
		if status == 0 {
			status = int(s.failStatus.Load())
		}
		s.committed.Store(true)
		s.w.WriteHeader(status)
	}
	s.handlerDone = true
}

func (s *hboneServerStream) Read(b []byte) (int, error) {
	n, err := s.body.Read(b)
	if errors.Is(err, io.EOF) {
		s.readEOF.Store(true)
	}
	return n, err
}

func (s *hboneServerStream) Write(b []byte) (int, error) {
	n, err := s.w.Write(b)
	if err != nil {
		return n, err
	}
	return n, s.rc.Flush()
}

// CloseWrite ends the stream (see the half-close note in hbone.go).
func (s *hboneServerStream) CloseWrite() error {
	s.writeOnce.Do(func() { close(s.writeDone) })
	return nil
}

// Close releases the stream. Unless both directions ended cleanly, an
// answered stream is reset (RST_STREAM), so the peer never mistakes an
// abort for an end of stream, and blocked reads and writes return.
func (s *hboneServerStream) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.handlerDone {
		return nil
	}
	s.closed = true
	clean := s.readEOF.Load()
	select {
	case <-s.writeDone:
	default:
		clean = false
	}
	if s.committed.Load() && !clean {
		past := time.Unix(1, 0)
		_ = s.rc.SetWriteDeadline(past)
		_ = s.rc.SetReadDeadline(past)
	}
	return nil
}

func (s *hboneServerStream) LocalAddr() net.Addr              { return s.local }
func (s *hboneServerStream) RemoteAddr() net.Addr             { return s.remote }
func (s *hboneServerStream) SetDeadline(time.Time) error      { return nil }
func (s *hboneServerStream) SetReadDeadline(time.Time) error  { return nil }
func (s *hboneServerStream) SetWriteDeadline(time.Time) error { return nil }

// hboneClientStream is one outbound CONNECT stream as a net.Conn: writes
// feed the request body, reads come from the response body.
type hboneClientStream struct {
	pw     *io.PipeWriter
	body   io.ReadCloser
	cancel context.CancelFunc // resets the stream if it is still open
	local  net.Addr
	remote net.Addr
}

func (s *hboneClientStream) Read(b []byte) (int, error)  { return s.body.Read(b) }
func (s *hboneClientStream) Write(b []byte) (int, error) { return s.pw.Write(b) }

// CloseWrite ends the request body: END_STREAM.
func (s *hboneClientStream) CloseWrite() error { return s.pw.Close() }

// Close resets the stream unless it already ended both ways.
func (s *hboneClientStream) Close() error {
	s.cancel()
	s.pw.CloseWithError(net.ErrClosed)
	return s.body.Close()
}

func (s *hboneClientStream) LocalAddr() net.Addr              { return s.local }
func (s *hboneClientStream) RemoteAddr() net.Addr             { return s.remote }
func (s *hboneClientStream) SetDeadline(time.Time) error      { return nil }
func (s *hboneClientStream) SetReadDeadline(time.Time) error  { return nil }
func (s *hboneClientStream) SetWriteDeadline(time.Time) error { return nil }
