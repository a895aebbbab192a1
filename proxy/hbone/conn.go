package hbone

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// ALPN is the protocol a meshproxy client offers first on a mesh mTLS
// connection; a meshproxy server that selects it speaks HBONE on that
// connection. Istio's own HBONE listener (15008) uses "h2".
const ALPN = "meshproxy-hbone"

// DecisionHeader is the response header in which a meshproxy server says
// why it refused a stream (its connection decision, such as
// bad_destination), so a client can tell a destination the server does
// not serve from a policy denial. Other HBONE peers ignore it.
const DecisionHeader = "meshproxy-decision"

// Defaults of a Conn.
const (
	// DefaultMaxStreams is how many streams a server lets a client open at
	// once (SETTINGS_MAX_CONCURRENT_STREAMS).
	DefaultMaxStreams = 100
	// DefaultStreamWindow is each stream's initial receive window
	// (SETTINGS_INITIAL_WINDOW_SIZE): what the peer may send ahead of the
	// app reading it, so also the most a stream buffers. A stream is
	// refilled after a quarter of its window is read.
	DefaultStreamWindow = 1 << 20
	// DefaultMaxStreamWindow is what the window of a stream alone on its
	// connection grows to once it carries a transfer: at 1 MiB a download
	// on loopback waited for WINDOW_UPDATE whenever a sidecar was not
	// scheduled for a moment (bulk 1.07-1.16x with 4 MiB, ztunnel's stream
	// window, paired A/Bs), and it still did at 4 MiB, where the sending
	// sidecar waited for window before 7 % of its writes with both
	// sidecars' sockets holding data (bulk 1.02-1.08x, upload 1.03-1.06x
	// with 16 MiB, three paired A/Bs). It is what a stream buffers for an
	// app that does not read; a per-connection mesh socket holds as much
	// in the kernel (its receive buffer grows to tcp_rmem's maximum). Across
	// zones a window caps one stream at window / round trip.
	DefaultMaxStreamWindow = 16 << 20
	// DefaultPrefaceTimeout bounds how long a server waits for the client
	// preface.
	DefaultPrefaceTimeout = 10 * time.Second
	// MaxWindow is the largest window HTTP/2 allows (RFC 9113 6.9.1).
	MaxWindow = 1<<31 - 1
)

const (
	initialWindow = 65535 // RFC 9113 6.9.2
	// connWindow is the connection receive window granted at once and kept
	// topped up as data arrives: each stream's own window bounds what it
	// buffers, so the connection level only has to stay out of the way.
	connWindow = 1 << 30
	// maxFrame is the default SETTINGS_MAX_FRAME_SIZE, one TLS record: the
	// DATA frames we send a peer that allows no more, the stream buffer's
	// chunk, and the pieces a longer DATA frame is read in.
	maxFrame = 16 << 10
	// maxReadFrame is the SETTINGS_MAX_FRAME_SIZE we advertise: a peer may
	// send a stream's whole write chunk as one DATA frame (see leadData),
	// which we read maxFrame at a time, as if it were that many frames.
	maxReadFrame = maxWriteChunk
	// maxRecord is the most plaintext one TLS record carries.
	maxRecord = 16 << 10
	// maxWriteBuffer is how much framed data may wait for the socket before
	// a stream's Write waits for it to drain.
	maxWriteBuffer = 256 << 10
	// maxControlBacklog is how much a peer may make us queue without
	// reading it (ping and settings acks, resets) before the connection is
	// closed.
	maxControlBacklog = 4 << 20
	// maxPooledBuffer is the largest write buffer returned to the pool: a
	// full write queue, and the TLS records of one (CorkConn).
	maxPooledBuffer = 1 << 20
	// frameHeaderLen is the size of an HTTP/2 frame header.
	frameHeaderLen = 9
	// leadRounds is how many writes a stream's Write makes on behalf of
	// others before it hands the rest to the connection's writer.
	leadRounds = 4
	// lingerTimeout is how long a connection we closed waits for the
	// peer to close its side.
	lingerTimeout = 5 * time.Second
	// maxHeaderList bounds a decoded header block.
	maxHeaderList = 16 << 10
)

// A write queue holds at most maxWriteBuffer plus one stream's chunk with
// its frame headers, and must still go back to the pool: a queue that
// outgrew it would be allocated anew on every write of a bulk transfer.
var _ [maxPooledBuffer - (maxWriteBuffer + maxWriteChunk + (maxWriteChunk/maxFrame+1)*frameHeaderLen)]struct{}

// Errors of a Conn and its streams.
var (
	// ErrUnavailable means the connection takes no new streams: it is
	// closed or going away. Another connection may.
	ErrUnavailable = errors.New("hbone connection takes no new streams")
	// ErrFull means the connection carries as many streams as the peer
	// allows.
	ErrFull = errors.New("hbone connection is at the peer's stream limit")
	// ErrRefused means the peer did not process the stream (REFUSED_STREAM,
	// or above a GOAWAY's last stream): it is safe to retry elsewhere.
	ErrRefused = errors.New("hbone stream refused before it was processed")
)

// ResetError is a stream reset by the peer (RST_STREAM) with its code.
type ResetError struct{ Code http2.ErrCode }

func (e *ResetError) Error() string { return "hbone stream reset by peer: " + e.Code.String() }

// Options tune a Conn; the zero value takes the defaults.
type Options struct {
	// MaxStreams is what a server advertises as
	// SETTINGS_MAX_CONCURRENT_STREAMS (default DefaultMaxStreams).
	MaxStreams uint32
	// StreamWindow is each stream's initial receive window (default
	// DefaultStreamWindow); while streams share the connection each is
	// kept to half of it.
	StreamWindow uint32
	// MaxStreamWindow is what a stream's window grows to while it is alone
	// on the connection and its app has read a quarter of StreamWindow (a
	// transfer, not a request; default DefaultMaxStreamWindow, at most
	// MaxWindow). Below StreamWindow: StreamWindow, no growth.
	MaxStreamWindow uint32
	// IdleTimeout closes the connection (GOAWAY) after it carried no stream
	// for this long; zero never does.
	IdleTimeout time.Duration
	// PrefaceTimeout bounds the wait for the client preface (server only;
	// default DefaultPrefaceTimeout).
	PrefaceTimeout time.Duration
	// KeepAlive sends a PING when nothing was read for this long while
	// streams are open, and closes the connection if nothing arrives
	// within another KeepAlive: a peer that vanished without a FIN is
	// found before an app connection waits on it for good. Zero: never.
	KeepAlive time.Duration
	// Cork, if set, is the socket under the connection's TLS: each flush
	// then reaches the socket in one write, however many TLS records it
	// takes.
	Cork *CorkConn
}

func (o Options) withDefaults() Options {
	if o.MaxStreams == 0 {
		o.MaxStreams = DefaultMaxStreams
	}
	if o.StreamWindow == 0 {
		o.StreamWindow = DefaultStreamWindow
	}
	o.StreamWindow = min(o.StreamWindow, MaxWindow)
	if o.MaxStreamWindow == 0 {
		o.MaxStreamWindow = DefaultMaxStreamWindow
	}
	o.MaxStreamWindow = min(max(o.MaxStreamWindow, o.StreamWindow), MaxWindow)
	if o.PrefaceTimeout == 0 {
		o.PrefaceTimeout = DefaultPrefaceTimeout
	}
	return o
}

// Conn is one HTTP/2 connection carrying CONNECT streams, client or server
// side. Make one with NewClient or NewServer on an established (mTLS)
// connection.
type Conn struct {
	nc     net.Conn
	server bool
	opts   Options
	in     *frameReader // what the reader reads frames from
	fr     *http2.Framer
	done   chan struct{} // closed when the connection is closed
	wake   chan struct{} // wakes the writer goroutine

	// Write side. wmu is never held during I/O, so the reader may take it.
	wmu         sync.Mutex
	wcond       *sync.Cond // space in wbuf or bbuf, or a write failed
	wbuf        []byte     // frames waiting for the socket: control, answers, small streams
	bbuf        []byte     // bulk streams' frames, written after wbuf's in each write
	flushing    bool       // a goroutine is writing
	werr        error
	henc        *hpack.Encoder
	hbuf        bytes.Buffer
	nextID      uint32 // client: the next stream ID
	closeWhen   bool   // close the socket once wbuf and bbuf are written
	closedWrite bool   // our direction of the socket is closed

	mu             sync.Mutex
	streams        map[uint32]*Stream
	active         int   // streams not yet released
	sendWindow     int64 // connection window for our DATA
	peerWindow     int64 // peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerMaxStreams uint32
	peerMaxFrame   int // peer's SETTINGS_MAX_FRAME_SIZE
	gotSettings    bool
	settingsc      chan struct{} // closed on the peer's first SETTINGS
	lastPeerID     uint32        // server: highest stream the client opened
	draining       bool          // GOAWAY sent or received
	goAwayID       uint32
	closed         bool
	err            error
	lastOpened     uint32 // client: highest stream we opened
	recvUnacked    int64  // connection window consumed, not yet returned
	idle           *time.Timer
	handler        func(*Stream) // server: runs each new stream

	// Streams whose buffered bulk data the reader is to flush (see
	// flushBatch); guarded by mu, and only the reader changes it.
	// hasPending mirrors len(pendingFlush) > 0 for the CorkConn's check
	// before a read waits.
	pendingFlush []*Stream
	hasPending   atomic.Bool

	lastRead  atomic.Int64 // unix nanoseconds of the last frame read
	keepAlive *time.Timer
	pinged    bool // a keepalive PING is unanswered; guarded by mu
}

// NewClient starts the client side of an HBONE connection on nc: the
// preface is queued (it goes out with the first stream) and the reader and
// writer goroutines run until the connection closes.
func NewClient(nc net.Conn, opts Options) *Conn {
	c := newConn(nc, false, opts)
	c.nextID = 1
	c.wbuf = append(c.wbuf, http2.ClientPreface...)
	c.wbuf = appendSettings(c.wbuf,
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: c.opts.StreamWindow},
		http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxReadFrame})
	c.wbuf = appendWindowUpdate(c.wbuf, 0, connWindow-initialWindow)
	c.armIdle()
	c.startKeepAlive()
	go c.writeLoop()
	go func() { _ = c.readLoop() }()
	return c
}

// startKeepAlive runs the keepalive check every KeepAlive.
func (c *Conn) startKeepAlive() {
	if c.opts.KeepAlive <= 0 {
		return
	}
	c.lastRead.Store(time.Now().UnixNano())
	c.mu.Lock()
	c.keepAlive = time.AfterFunc(c.opts.KeepAlive, c.checkAlive)
	c.mu.Unlock()
}

// checkAlive pings a connection with open streams that went quiet, and
// closes one whose ping went unanswered.
func (c *Conn) checkAlive() {
	quiet := time.Since(time.Unix(0, c.lastRead.Load()))
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	ping, dead := false, false
	switch {
	case quiet < c.opts.KeepAlive:
		c.pinged = false
	case c.pinged:
		dead = true
	case c.active > 0:
		c.pinged, ping = true, true
	}
	c.mu.Unlock()
	if dead {
		c.fail(fmt.Errorf("peer silent for %s, keepalive ping unanswered", quiet.Round(time.Second)))
		return
	}
	if ping {
		c.queue(false, func(b []byte) []byte { return appendPing(b, false, [8]byte{'k', 'e', 'e', 'p'}) })
	}
	c.keepAlive.Reset(c.opts.KeepAlive)
}

// NewServer prepares the server side of an HBONE connection on nc; Serve
// runs it.
func NewServer(nc net.Conn, opts Options) *Conn {
	return newConn(nc, true, opts)
}

func newConn(nc net.Conn, server bool, opts Options) *Conn {
	c := &Conn{
		nc:             nc,
		server:         server,
		opts:           opts.withDefaults(),
		done:           make(chan struct{}),
		wake:           make(chan struct{}, 1),
		streams:        make(map[uint32]*Stream),
		sendWindow:     initialWindow,
		peerWindow:     initialWindow,
		peerMaxStreams: math.MaxUint32,
		peerMaxFrame:   maxFrame,
		settingsc:      make(chan struct{}),
	}
	c.wcond = sync.NewCond(&c.wmu)
	c.henc = hpack.NewEncoder(&c.hbuf)
	var r io.Reader = nc
	if _, ok := nc.(*tls.Conn); !ok {
		// crypto/tls buffers a record already; a plain socket needs it.
		r = bufio.NewReaderSize(nc, 32<<10)
	}
	c.in = &frameReader{off: frameHeaderLen, r: r}
	if c.opts.Cork != nil {
		c.opts.Cork.beforeWait(c.hasPending.Load, c.flushAll)
	}
	c.fr = http2.NewFramer(nil, c.in)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = maxHeaderList
	c.fr.SetMaxReadFrameSize(maxReadFrame)
	return c
}

// Serve reads the client preface and serves streams, calling handle in a
// goroutine of its own for each new one, until the connection closes. The
// handler must answer the stream (Respond) and Close it. Serve returns nil
// when the client closed the connection cleanly.
func (c *Conn) Serve(handle func(*Stream)) error {
	go c.writeLoop()
	_ = c.nc.SetReadDeadline(time.Now().Add(c.opts.PrefaceTimeout))
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c.nc, preface[:]); err != nil {
		err = fmt.Errorf("read hbone client preface: %w", err)
		c.fail(err)
		return err
	}
	if string(preface[:]) != http2.ClientPreface {
		err := errors.New("not an HTTP/2 client preface")
		c.fail(err)
		return err
	}
	_ = c.nc.SetReadDeadline(time.Time{})
	c.queue(false, func(b []byte) []byte {
		b = appendSettings(b,
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: c.opts.MaxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: c.opts.StreamWindow},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxReadFrame})
		return appendWindowUpdate(b, 0, connWindow-initialWindow)
	})
	c.handler = handle
	c.armIdle()
	c.startKeepAlive()
	err := c.readLoop()
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// Done is closed when the connection has closed.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the connection closed: nil while it is open or after a clean
// close (ours, or the peer's end of stream).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(c.err, net.ErrClosed) || errors.Is(c.err, io.EOF) {
		return nil
	}
	return c.err
}

// Close closes the connection at once; open streams fail.
func (c *Conn) Close() error {
	c.fail(net.ErrClosed)
	return nil
}

// Shutdown starts a graceful close: GOAWAY tells the peer no new streams
// are taken, streams already open finish, and the connection closes when
// the last one does.
func (c *Conn) Shutdown() {
	c.mu.Lock()
	if c.closed || c.draining {
		c.mu.Unlock()
		return
	}
	c.draining = true
	last, idle := c.lastPeerID, c.active == 0
	c.mu.Unlock()
	c.queue(false, func(b []byte) []byte { return appendGoAway(b, last, http2.ErrCodeNo) })
	if idle {
		c.closeAfterFlush()
	}
}

// Available is how many more streams the client may open now: zero when
// the connection is closed, going away or full. Before the server's
// SETTINGS arrive, one (the stream that rides with the preface).
func (c *Conn) Available() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.draining {
		return 0
	}
	limit := int64(c.peerMaxStreams)
	if !c.gotSettings {
		limit = 1
	}
	return int(max(0, limit-int64(c.active)))
}

// Active is the number of streams open on the connection.
func (c *Conn) Active() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// WaitSettings waits for the peer's first SETTINGS, which carry its stream
// limit, flushing our preface first.
func (c *Conn) WaitSettings(ctx context.Context) error {
	c.kick()
	select {
	case <-c.settingsc:
		return nil
	case <-c.done:
		return c.closeErr()
	case <-ctx.Done():
		return fmt.Errorf("wait for hbone settings: %w", ctx.Err())
	}
}

func (c *Conn) closeErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return fmt.Errorf("hbone connection closed: %w", c.err)
	}
	return ErrUnavailable
}

// Open starts a CONNECT stream for authority (client side) and waits for
// the server's answer. A stream is returned whatever the status (see
// Stream.Status); the caller closes it.
func (c *Conn) Open(ctx context.Context, authority string) (*Stream, error) {
	c.mu.Lock()
	switch {
	case c.closed || c.draining:
		c.mu.Unlock()
		return nil, ErrUnavailable
	case c.active >= int(c.peerMaxStreams) || !c.gotSettings && c.active >= 1:
		c.mu.Unlock()
		return nil, ErrFull
	}
	c.active++
	c.stopIdle()
	c.mu.Unlock()

	var s *Stream
	err := c.queue(true, func(b []byte) []byte {
		id := c.nextID
		if id > math.MaxInt32 {
			// Stream IDs are used up: new streams go to a new connection.
			c.mu.Lock()
			c.draining = true
			c.mu.Unlock()
			return b
		}
		c.nextID += 2
		s = c.newStream(id)
		c.mu.Lock()
		s.sendWindow = c.peerWindow
		c.streams[id] = s
		c.lastOpened = id
		c.mu.Unlock()
		c.hbuf.Reset()
		_ = c.henc.WriteField(hpack.HeaderField{Name: ":method", Value: "CONNECT"})
		_ = c.henc.WriteField(hpack.HeaderField{Name: ":authority", Value: authority})
		return appendHeaders(b, id, c.hbuf.Bytes(), false)
	})
	if s == nil {
		c.mu.Lock()
		drained := c.release()
		c.mu.Unlock()
		if drained {
			c.closeAfterFlush()
		}
		if err == nil {
			err = ErrUnavailable
		}
		return nil, err
	}
	select {
	case <-s.respDone:
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("hbone CONNECT %s: %w", authority, ctx.Err())
	}
	c.mu.Lock()
	status, serr := s.status, s.err
	if s.rstErr != nil {
		serr = s.rstErr
	}
	c.mu.Unlock()
	if status == 0 {
		s.Close()
		return nil, fmt.Errorf("hbone CONNECT %s: %w", authority, serr)
	}
	return s, nil
}

// queue appends frames built by build to the write buffer. With lead, a
// stream's goroutine writes the buffer itself when no write is in
// progress (no hand-off), after waiting for room; without, the writer
// goroutine is woken and the caller never blocks (the reader, Close).
func (c *Conn) queue(lead bool, build func([]byte) []byte) error {
	return c.enqueue(lead, false, false, build)
}

// queueFor is queue for frames of stream s (nil: none): a bulk stream's
// frames go to its queue, behind its DATA, so that nothing it sends
// overtakes what it sent before.
func (c *Conn) queueFor(s *Stream, lead bool, build func([]byte) []byte) error {
	return c.enqueue(lead, false, s != nil && s.bulk.Load(), build)
}

// queueData is queue(true) for a stream's DATA: before it leads a write,
// it yields once so that streams woken by the same poll add their frames
// to it (one write for all). Frames that open, answer or end a stream do
// not wait for that.
func (c *Conn) queueData(bulk bool, build func([]byte) []byte) error {
	return c.enqueue(true, true, bulk, build)
}

// enqueue adds frames to the small queue (wbuf) or, for a bulk stream,
// to the bulk queue (bbuf). Each write takes both, the small queue's
// frames first: a request or control frame never waits behind more bulk
// data than one write carries, and a stream's Write waits for room only
// in its own queue.
func (c *Conn) enqueue(lead, yield, bulk bool, build func([]byte) []byte) error {
	c.wmu.Lock()
	q := &c.wbuf
	if bulk {
		q = &c.bbuf
	}
	if lead {
		for len(*q) >= maxWriteBuffer && c.werr == nil {
			c.wcond.Wait()
		}
	}
	if c.werr != nil {
		err := c.werr
		c.wmu.Unlock()
		return err
	}
	if *q == nil {
		*q = getBuffer()
	}
	*q = build(*q)
	if !lead && len(c.wbuf)+len(c.bbuf) > maxControlBacklog {
		c.wmu.Unlock()
		c.fail(errors.New("peer does not read what it asks for"))
		return ErrUnavailable
	}
	if !lead || c.flushing {
		c.wmu.Unlock()
		if !lead {
			c.kick()
		}
		return nil
	}
	if yield {
		// Let the goroutines that are ready to run — streams woken by
		// the same poll, each with a message of its own — add their
		// frames first: they find a flush in progress and leave theirs
		// to it, so one write carries them all (and the peer reads them
		// in one read).
		c.flushing = true
		c.wmu.Unlock()
		runtime.Gosched()
		c.wmu.Lock()
	}
	return c.flushLocked(leadRounds)
}

// leadData sends chunk, bulk stream s's, as one DATA frame without
// copying it into the bulk queue: the stream's goroutine writes the
// frame's header with the head of the payload (one full TLS record), then
// the rest straight from chunk, after what the small queue holds — one
// copy of a bulk transfer's bytes fewer than queueData's framing (the
// sidecars' memmove per byte -16 %, their CPU per GB 0.96-0.99x, MB/s
// level within noise; bench/RESULTS.md, twelfth pass). The peer must
// allow a frame of len(chunk) (SETTINGS_MAX_FRAME_SIZE; a meshproxy peer
// allows maxReadFrame). When another goroutine is writing, or the bulk queue
// holds frames, which go first, the frame is queued as queueData does.
func (c *Conn) leadData(s *Stream, chunk []byte) error {
	build := s.dataFrames(chunk, false, len(chunk))
	c.wmu.Lock()
	if c.werr != nil || c.flushing || len(c.bbuf) > 0 {
		c.wmu.Unlock()
		return c.queueData(true, build)
	}
	c.flushing = true // as queueData, yield to streams woken by the same poll
	c.wmu.Unlock()
	runtime.Gosched()
	c.wmu.Lock()
	if c.werr != nil {
		err := c.werr
		c.flushing = false
		c.wmu.Unlock()
		return err
	}
	if len(c.bbuf) > 0 || s.rstSent {
		if c.bbuf == nil {
			c.bbuf = getBuffer()
		}
		c.bbuf = build(c.bbuf)
		return c.flushLocked(leadRounds)
	}
	small := c.wbuf
	c.wbuf = nil
	c.wmu.Unlock()
	k := min(len(chunk), maxRecord-frameHeaderLen)
	head := appendFrameHeader(getBuffer(), len(chunk), http2.FrameData, 0, s.id)
	head = append(head, chunk[:k]...)
	if err := c.wrote(c.write(small, head, chunk[k:]), small, head); err != nil {
		return err
	}
	return c.flushLocked(leadRounds) // what was queued meanwhile
}

func (c *Conn) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// flushLocked writes the buffer until it is empty (or after rounds writes
// hands the rest to the writer goroutine; rounds < 0: no limit). Called
// with wmu held and no write in progress; returns with it released.
func (c *Conn) flushLocked(rounds int) error {
	c.flushing = true
	for i := 0; len(c.wbuf) > 0 || len(c.bbuf) > 0; i++ {
		if i == rounds {
			c.flushing = false
			c.wmu.Unlock()
			c.kick()
			return nil
		}
		small, bulk := c.wbuf, c.bbuf
		c.wbuf, c.bbuf = nil, nil // the next frame takes a buffer from the pool
		c.wmu.Unlock()
		if err := c.wrote(c.write(small, bulk, nil), small, bulk); err != nil {
			return err
		}
	}
	c.flushing = false
	closeNow := c.closeWhen
	c.wmu.Unlock()
	if closeNow {
		c.closeSocket()
	}
	return nil
}

// closeSocket ends a connection that has nothing more to say: our
// direction is closed (TLS close_notify or FIN) and the reader runs on
// until the peer closes too, so nothing it sent last is lost to a reset;
// a peer that never closes is cut off after lingerTimeout.
func (c *Conn) closeSocket() {
	c.wmu.Lock()
	once := !c.closedWrite
	c.closedWrite = true
	c.wmu.Unlock()
	if !once {
		return
	}
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		time.AfterFunc(lingerTimeout, func() { c.fail(net.ErrClosed) })
		return
	}
	c.fail(net.ErrClosed)
}

// write sends a, b and d, in order, on the connection (the small queue, then
// the bulk queue or a frame leadData writes). crypto/tls writes each
// record to the socket on its own: whatever takes more than one record is
// corked into one write — many streams' requests at once, so the peer
// reads them together, and a bulk transfer's records, up to a
// maxWriteChunk of them at once: on a host whose TCP paces (BBR), the size
// of the writes to the mesh socket sets a transfer's speed (pooled bulk
// 1.13x with 512 KiB corked writes against 128 KiB ones written record by
// record, where corking 128 KiB had made no difference; see
// forward.bulkBufSize). Up to one record is one write anyway.
func (c *Conn) write(a, b, d []byte) error {
	write := func() error {
		for _, p := range [...][]byte{a, b, d} {
			if len(p) == 0 {
				continue
			}
			if _, err := c.nc.Write(p); err != nil {
				return err
			}
		}
		return nil
	}
	if c.opts.Cork == nil {
		return write()
	}
	return c.opts.Cork.Gather(len(a)+len(b)+len(d), write)
}

// wrote ends a write that returned err: the pooled buffers a and b go
// back, writers waiting for room are woken, and a failed write fails the
// connection. It takes wmu, and returns with it held unless err is not
// nil.
func (c *Conn) wrote(err error, a, b []byte) error {
	c.wmu.Lock()
	putBuffer(a)
	putBuffer(b)
	c.wcond.Broadcast()
	if err != nil {
		c.flushing = false
		c.wmu.Unlock()
		err = fmt.Errorf("hbone write: %w", err)
		c.fail(err)
		return err
	}
	return nil
}

// writeLoop writes what the reader and Close queue, and what a leading
// Write handed over.
func (c *Conn) writeLoop() {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		c.wmu.Lock()
		if c.flushing {
			c.wmu.Unlock()
			continue
		}
		if len(c.wbuf) == 0 && len(c.bbuf) == 0 {
			closeNow := c.closeWhen
			c.wmu.Unlock()
			if closeNow {
				c.closeSocket()
			}
			continue
		}
		_ = c.flushLocked(-1)
	}
}

// closeAfterFlush closes the socket once everything queued is written.
func (c *Conn) closeAfterFlush() {
	c.wmu.Lock()
	c.closeWhen = true
	c.wmu.Unlock()
	c.kick()
}

// fail closes the connection: every stream not finished fails with err.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.err = err
	for _, s := range c.streams {
		if s.err == nil {
			s.err = fmt.Errorf("hbone connection closed: %w", err)
		}
		s.wake()
	}
	if c.idle != nil {
		c.idle.Stop()
	}
	if c.keepAlive != nil {
		c.keepAlive.Stop()
	}
	c.mu.Unlock()
	close(c.done)
	c.nc.Close()
	c.wmu.Lock()
	if c.werr == nil {
		c.werr = fmt.Errorf("hbone connection closed: %w", err)
	}
	c.wbuf, c.bbuf = nil, nil
	c.wcond.Broadcast()
	c.wmu.Unlock()
}

// armIdle starts the idle timer if there is one and no stream is open.
// Called with mu held, or before the connection is shared.
func (c *Conn) armIdle() {
	if c.opts.IdleTimeout <= 0 || c.active > 0 || c.closed {
		return
	}
	if c.idle == nil {
		c.idle = time.AfterFunc(c.opts.IdleTimeout, c.idleExpired)
		return
	}
	c.idle.Reset(c.opts.IdleTimeout)
}

func (c *Conn) stopIdle() {
	if c.idle != nil {
		c.idle.Stop()
	}
}

func (c *Conn) idleExpired() {
	c.mu.Lock()
	idle := c.active == 0 && !c.closed
	c.mu.Unlock()
	if idle {
		c.Shutdown()
	}
}

// release accounts for a stream going away; drained reports that it was
// the last one of a connection going away, which the caller then closes
// (closeAfterFlush) once its own frames are queued. Called with mu held.
func (c *Conn) release() (drained bool) {
	c.active--
	if c.active > 0 {
		return false
	}
	if c.draining && !c.closed {
		return true
	}
	c.armIdle()
	return false
}

// frameReader is what the Framer reads from: the connection, after the
// header of the frame it is to read, which readFrame has read already. It
// also holds where readFrame is in a DATA frame it reads in pieces.
type frameReader struct {
	hdr [frameHeaderLen]byte
	off int // hdr[off:] is still to be read
	r   io.Reader

	inData   bool   // a DATA frame's payload is being read
	dataID   uint32 // its stream
	dataLeft int    // payload bytes still to read
	dataEnd  bool   // it ends its stream
}

func (p *frameReader) Read(b []byte) (int, error) {
	if p.off < len(p.hdr) {
		n := copy(b, p.hdr[p.off:])
		p.off += n
		return n, nil
	}
	return p.r.Read(b)
}

// readFrame reads the next frame, or the next piece of one. A DATA frame
// that needs none of the Framer's work (unpadded, on a stream, within the
// size limit) is read and handled here — f is nil, herr what handling it
// found wrong — maxFrame at a time, each piece handled as a frame of its
// own (END_STREAM with the last) and read straight into a stream buffer
// chunk, which a full piece's stream then keeps: the bytes of a bulk
// transfer are copied once, by crypto/tls, not again into the stream's
// buffer. Any other frame is returned for handle, the Framer reading it
// from its header on.
func (c *Conn) readFrame() (f http2.Frame, herr, err error) {
	in := c.in
	if !in.inData {
		if _, err := io.ReadFull(in.r, in.hdr[:]); err != nil {
			return nil, nil, err
		}
		length := int(in.hdr[0])<<16 | int(in.hdr[1])<<8 | int(in.hdr[2])
		typ, flags := http2.FrameType(in.hdr[3]), http2.Flags(in.hdr[4])
		id := binary.BigEndian.Uint32(in.hdr[5:]) & 0x7fffffff
		if typ != http2.FrameData || flags.Has(http2.FlagDataPadded) || id == 0 || length > maxReadFrame {
			in.off = 0
			f, err := c.fr.ReadFrame()
			return f, nil, err
		}
		in.inData, in.dataID, in.dataLeft, in.dataEnd = true, id, length, flags.Has(http2.FlagDataEndStream)
	}
	n := min(in.dataLeft, maxFrame)
	a := chunks.Get().(*[maxFrame]byte)
	if _, err := io.ReadFull(in.r, a[:n]); err != nil {
		chunks.Put(a)
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the header promised more
		}
		return nil, nil, err
	}
	in.dataLeft -= n
	in.inData = in.dataLeft > 0
	return nil, c.onData(in.dataID, n, a[:n], in.dataEnd && !in.inData, a), nil
}

// readLoop reads and handles frames until the connection fails.
func (c *Conn) readLoop() error {
	for {
		f, herr, err := c.readFrame()
		if c.opts.KeepAlive > 0 {
			c.lastRead.Store(time.Now().UnixNano())
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				c.resetStream(se.StreamID, se.Code, &ResetError{Code: se.Code})
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				c.goAwayAndClose(http2.ErrCode(ce), err)
				return err
			}
			c.fail(err)
			return err
		}
		if f != nil {
			herr = c.handle(f)
		}
		if herr != nil {
			c.goAwayAndClose(http2.ErrCodeProtocol, herr)
			return herr
		}
	}
}

func (c *Conn) goAwayAndClose(code http2.ErrCode, err error) {
	c.mu.Lock()
	last := c.lastPeerID
	c.mu.Unlock()
	c.queue(false, func(b []byte) []byte { return appendGoAway(b, last, code) })
	c.closeAfterFlush()
	// Bounded: the peer must not keep the connection open by not reading.
	time.AfterFunc(lingerTimeout, func() { c.fail(err) })
}

func (c *Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return c.onData(f.StreamID, int(f.Header().Length), f.Data(), f.StreamEnded(), nil)
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.RSTStreamFrame:
		c.mu.Lock()
		s := c.streams[f.StreamID]
		if s != nil {
			s.peerReset(f.ErrCode)
		}
		c.mu.Unlock()
	case *http2.PingFrame:
		if !f.IsAck() {
			c.queue(false, func(b []byte) []byte { return appendPing(b, true, f.Data) })
		}
	case *http2.GoAwayFrame:
		c.onGoAway(f)
	case *http2.PushPromiseFrame:
		return errors.New("push promise, which we disabled")
	}
	return nil // PRIORITY and unknown frames are ignored
}

func (c *Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	var (
		window       int64 = -1
		tableSize    uint32
		setTableSize bool
	)
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			window = int64(s.Val)
		case http2.SettingMaxConcurrentStreams:
			c.mu.Lock()
			c.peerMaxStreams = s.Val
			c.mu.Unlock()
		case http2.SettingMaxFrameSize:
			c.mu.Lock()
			c.peerMaxFrame = int(s.Val)
			c.mu.Unlock()
		case http2.SettingHeaderTableSize:
			tableSize, setTableSize = s.Val, true
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("settings: %w", err)
	}
	if setTableSize {
		c.wmu.Lock()
		c.henc.SetMaxDynamicTableSizeLimit(tableSize)
		c.wmu.Unlock()
	}
	c.mu.Lock()
	if window >= 0 {
		delta := window - c.peerWindow
		c.peerWindow = window
		for _, s := range c.streams {
			s.sendWindow += delta
			s.wcond.Broadcast()
		}
	}
	if !c.gotSettings {
		c.gotSettings = true
		close(c.settingsc)
	}
	c.mu.Unlock()
	c.queue(false, appendSettingsAck)
	return nil
}

func (c *Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		c.sendWindow += int64(f.Increment)
		if c.sendWindow > math.MaxInt32 {
			return errors.New("connection window overflow")
		}
		for _, s := range c.streams {
			s.wcond.Broadcast()
		}
		return nil
	}
	if s := c.streams[f.StreamID]; s != nil {
		s.sendWindow += int64(f.Increment)
		s.wcond.Broadcast()
	}
	return nil
}

func (c *Conn) onGoAway(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.draining = true
	c.goAwayID = f.LastStreamID
	if !c.server {
		for id, s := range c.streams {
			if id > f.LastStreamID && s.err == nil {
				s.err = ErrRefused
				s.wake()
			}
		}
	}
	idle := c.active == 0
	c.mu.Unlock()
	if idle {
		c.closeAfterFlush()
	}
}

// onData delivers a DATA frame to its stream: length is the frame's,
// padding included, data its payload, end its END_STREAM flag; own, if not
// nil, is the chunk data was read into, which the stream keeps if it
// buffers a whole full frame (else it goes back to the pool). The
// connection window is returned at once; the stream's only as the app
// reads.
func (c *Conn) onData(id uint32, length int, data []byte, end bool, own *[maxFrame]byte) error {
	defer func() {
		if own != nil {
			chunks.Put(own)
		}
	}()
	n := int64(length)
	var connInc uint32
	c.mu.Lock()
	c.recvUnacked += n
	if c.recvUnacked >= connWindow/4 {
		connInc, c.recvUnacked = uint32(c.recvUnacked), 0
	}
	s := c.streams[id]
	var rst http2.ErrCode
	var streamInc uint32
	switch {
	case s == nil:
		if id > c.highestID() {
			c.mu.Unlock()
			return fmt.Errorf("data on idle stream %d", id)
		}
		// A stream we released or reset: drop it.
	case s.recvEnd:
		rst = http2.ErrCodeStreamClosed
	case n > s.recvWindow:
		rst = http2.ErrCodeFlowControl
	case !c.server && s.status == 0:
		rst = http2.ErrCodeProtocol
	default:
		s.recvWindow -= n
		if pad := n - int64(len(data)); pad > 0 {
			s.recvWindow += pad
			streamInc = uint32(pad)
		}
		rest := data
		if s.rstErr == nil {
			var inc uint32
			rest, inc = s.push(data) // releases mu while it writes
			streamInc += inc
		}
		if len(rest) > 0 && s.rstErr == nil && !s.released {
			if own != nil && len(rest) == maxFrame {
				s.recv = append(s.recv, chunk{a: own, n: maxFrame}) // read into it: nothing to copy
				own = nil
			} else {
				s.deliver(rest)
			}
		}
		if end {
			s.recvEnd = true
		}
		// A stream alone on its connection (see flushBatch).
		bulkSink := len(rest) > 0 && !end && s.sink != nil && s.sinkErr == nil && s.err == nil && s.rstErr == nil &&
			c.opts.Cork != nil && c.active == 1
		switch {
		case bulkSink && s.window-s.recvWindow-s.unacked < flushBatch:
			c.deferFlush(s)
		case bulkSink:
			s.flushPending = false
			s.flushBuffered() // releases mu while it writes
		case len(rest) > 0 || end || s.sink == nil || s.sinkErr != nil || s.err != nil || s.rstErr != nil:
			s.rcond.Signal() // pushed whole: nothing to wake the forwarder for
		}
		c.flushOthersLocked(s)
	}
	if rst != 0 {
		s.resetLocal(rst)
	}
	c.mu.Unlock()
	if connInc > 0 || streamInc > 0 || rst != 0 {
		var to *Stream // a reset follows the stream's own frames
		if rst != 0 {
			to = s
		}
		c.queueFor(to, false, func(b []byte) []byte {
			if connInc > 0 {
				b = appendWindowUpdate(b, 0, connInc)
			}
			if streamInc > 0 && (s == nil || !s.rstSent) {
				b = appendWindowUpdate(b, id, streamInc)
			}
			if rst != 0 {
				b = s.appendRST(b, rst)
			}
			return b
		})
	}
	return nil
}

// A bulk transfer's full frames, which a stream alone on its connection
// leaves in its buffer (see push), are not handed to its forwarder one by
// one: waking a goroutine on another thread costs a virtual machine more
// than decrypting the frame, and the forwarder's writev would then read
// bytes another core just wrote. The reader defers them and writes them
// itself, in one writev that never waits (flushBuffered), once flushBatch
// is buffered, when a frame of another stream arrives, and before it waits
// for the socket (the CorkConn under the TLS asks: beforeWait), so the last
// of a burst never waits for more; what the app's socket does not take goes
// to the forwarder, as before. Streams sharing the connection hand every
// frame over at once: the reader must not spend its time writing one
// stream's bulk data while frames of the others wait behind it.
//
// 512 KiB, as the forwarder's bulk buffer: each write to the app wakes it,
// and with 128 KiB batches the pooled mode wrote the app 112 KiB at a time
// where per-connection mode wrote 475 (bulk 1.05x, upload 1.04x in pooled
// mode with 512 KiB; bench/RESULTS.md, twelfth pass).
const flushBatch = 512 << 10

// deferFlush notes that s has buffered data to flush. Called with mu held.
func (c *Conn) deferFlush(s *Stream) {
	if !s.flushPending {
		s.flushPending = true
		c.pendingFlush = append(c.pendingFlush, s)
		c.hasPending.Store(true)
	}
}

// flushOthersLocked flushes the pending streams other than s (nil: all).
// Called by the reader with mu held, which each flush releases while it
// writes.
func (c *Conn) flushOthersLocked(s *Stream) {
	if len(c.pendingFlush) == 0 || len(c.pendingFlush) == 1 && c.pendingFlush[0] == s {
		return
	}
	keep := false
	for _, o := range c.pendingFlush { // only the reader changes the list
		if o == s {
			keep = o.flushPending
			continue
		}
		if o.flushPending {
			o.flushPending = false
			o.flushBuffered()
		}
	}
	clear(c.pendingFlush)
	c.pendingFlush = c.pendingFlush[:0]
	if keep {
		c.pendingFlush = append(c.pendingFlush, s)
	}
	c.hasPending.Store(len(c.pendingFlush) > 0)
}

// flushAll flushes every pending stream: the reader is about to wait for
// the socket.
func (c *Conn) flushAll() {
	c.mu.Lock()
	c.flushOthersLocked(nil)
	c.mu.Unlock()
}

// highestID is the highest stream ID in use either way. Called with mu held.
func (c *Conn) highestID() uint32 {
	if c.server {
		return c.lastPeerID
	}
	return c.lastOpened
}

func (c *Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	if s := c.streams[id]; s != nil {
		defer c.mu.Unlock()
		if !c.server && s.status == 0 {
			code, err := strconv.Atoi(f.PseudoValue("status"))
			if err != nil || code < 100 || code > 999 {
				s.resetLocal(http2.ErrCodeProtocol)
				go c.queueFor(s, false, func(b []byte) []byte { return s.appendRST(b, http2.ErrCodeProtocol) })
				return nil
			}
			if code < 200 && !f.StreamEnded() {
				return nil // informational: the final answer follows
			}
			s.status = code
			if code != http.StatusOK {
				for _, hf := range f.RegularFields() {
					if hf.Name == DecisionHeader {
						s.failReason = hf.Value
					}
				}
			}
			s.respond()
		}
		if f.StreamEnded() { // the response or trailers end the stream
			s.recvEnd = true
			s.rcond.Signal()
		}
		return nil
	}
	if !c.server || id%2 == 0 || id <= c.lastPeerID {
		c.mu.Unlock()
		if !c.server || id%2 == 0 {
			return fmt.Errorf("headers on stream %d that we did not open", id)
		}
		return nil // trailers of a stream already released
	}
	c.lastPeerID = id
	refuse := http2.ErrCode(0)
	switch {
	case c.draining || c.closed:
		refuse = http2.ErrCodeRefusedStream
	case c.active >= int(c.opts.MaxStreams):
		refuse = http2.ErrCodeRefusedStream
	case f.Truncated:
		refuse = http2.ErrCodeProtocol
	}
	if refuse != 0 {
		c.mu.Unlock()
		c.queue(false, func(b []byte) []byte { return appendRST(b, id, refuse) })
		return nil
	}
	s := c.newStream(id)
	s.sendWindow = c.peerWindow
	s.method = f.PseudoValue("method")
	s.authority = f.PseudoValue("authority")
	s.recvEnd = f.StreamEnded()
	c.streams[id] = s
	c.active++
	c.stopIdle()
	c.mu.Unlock()
	go c.handler(s)
	return nil
}

// resetStream resets stream id with code after a stream-level error.
func (c *Conn) resetStream(id uint32, code http2.ErrCode, err error) {
	c.mu.Lock()
	s := c.streams[id]
	if s != nil {
		s.resetLocal(code)
		if s.err == nil {
			s.err = err
		}
	}
	c.mu.Unlock()
	c.queueFor(s, false, func(b []byte) []byte { return appendRST(b, id, code) })
}

// Write buffers are shared by every connection through a pool, so an idle
// connection holds none.
var buffers = sync.Pool{New: func() any {
	b := make([]byte, 0, 16<<10)
	return &b
}}

func getBuffer() []byte { return (*buffers.Get().(*[]byte))[:0] }

func putBuffer(b []byte) {
	if cap(b) == 0 || cap(b) > maxPooledBuffer {
		return
	}
	b = b[:0]
	buffers.Put(&b)
}
