package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// gateConn holds every Write while shut, and says when one is held: the
// write in progress (whoever leads it) stays in flight, so what streams
// queue meanwhile goes out in the next write, in the order the
// connection's queues give it.
type gateConn struct {
	net.Conn
	mu   sync.Mutex
	cond *sync.Cond
	shut bool
	held chan struct{} // a Write is held
}

func newGateConn(c net.Conn) *gateConn {
	g := &gateConn{Conn: c, held: make(chan struct{}, 1)}
	g.cond = sync.NewCond(&g.mu)
	return g
}

func (g *gateConn) Write(p []byte) (int, error) {
	g.mu.Lock()
	for g.shut {
		select {
		case g.held <- struct{}{}:
		default:
		}
		g.cond.Wait()
	}
	g.mu.Unlock()
	return g.Conn.Write(p)
}

func (g *gateConn) setShut(shut bool) {
	g.mu.Lock()
	g.shut = shut
	g.mu.Unlock()
	g.cond.Broadcast()
}

// teeConn records what is read from it.
type teeConn struct {
	net.Conn
	mu  sync.Mutex
	rec bytes.Buffer
}

func (t *teeConn) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	t.mu.Lock()
	t.rec.Write(p[:n])
	t.mu.Unlock()
	return n, err
}

// wireFrame is one frame the server read, in order.
type wireFrame struct {
	typ  http2.FrameType
	id   uint32
	n    int // DATA payload
	end  bool
	code http2.ErrCode // RST_STREAM
}

func (t *teeConn) frames(tb testing.TB) []wireFrame {
	tb.Helper()
	t.mu.Lock()
	rec := bytes.Clone(t.rec.Bytes())
	t.mu.Unlock()
	if !bytes.HasPrefix(rec, []byte(http2.ClientPreface)) {
		tb.Fatalf("the server did not read the client preface first")
	}
	fr := http2.NewFramer(nil, bytes.NewReader(rec[len(http2.ClientPreface):]))
	fr.SetMaxReadFrameSize(maxReadFrame)
	var out []wireFrame
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
				tb.Fatalf("parse what the server read: %v", err)
			}
			return out
		}
		w := wireFrame{typ: f.Header().Type, id: f.Header().StreamID}
		switch f := f.(type) {
		case *http2.DataFrame:
			w.n, w.end = len(f.Data()), f.StreamEnded()
		case *http2.RSTStreamFrame:
			w.code = f.ErrCode
		}
		out = append(out, w)
	}
}

// gatedPair is pair with the client's writes through a gate and the
// server's reads recorded.
func gatedPair(t *testing.T, opts Options, handle func(*Stream)) (*Conn, *gateConn, *teeConn) {
	t.Helper()
	cs, ss := tcpPair(t)
	gate, tee := newGateConn(cs), &teeConn{Conn: ss}
	client, _ := pairOver(t, gate, tee, opts, handle)
	t.Cleanup(func() { gate.setShut(false) }) // registered last, so it runs before the connections close
	return client, gate, tee
}

// readWithin reads n bytes from r, failing the test if they do not come
// within wait (a Stream has no read deadline).
func readWithin(t *testing.T, r io.Reader, n int) []byte {
	t.Helper()
	buf := make([]byte, n)
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(r, buf); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("read %d bytes: %v", n, err)
		}
	case <-time.After(wait):
		t.Fatalf("%d bytes did not arrive within %v", n, wait)
	}
	return buf
}

// awaitHeld waits until the gate holds a write.
func awaitHeld(t *testing.T, g *gateConn) {
	t.Helper()
	select {
	case <-g.held:
	case <-time.After(wait):
		t.Fatal("no write reached the shut gate")
	}
}

// TestSmallFramesGoAheadOfQueuedBulk: while a write is in flight, a bulk
// stream's DATA queued behind it does not go out before a request another
// stream queued later; the bulk stream's END_STREAM, and another bulk
// stream's RST_STREAM, still follow their own DATA.
func TestSmallFramesGoAheadOfQueuedBulk(t *testing.T) {
	got := make(chan int64, 4)
	client, gate, tee := gatedPair(t, Options{}, func(s *Stream) {
		switch s.Authority() {
		case "small:1":
			echo(s)
		default:
			n, _ := io.Copy(io.Discard, s)
			got <- n
		}
	})
	lead, bulk, aborted, small := open(t, client, "lead:1"), open(t, client, "bulk:1"), open(t, client, "aborted:1"), open(t, client, "small:1")

	gate.setShut(true)
	leadDone := make(chan error, 1)
	go func() { _, err := lead.Write(randomBytes(64 << 10)); leadDone <- err }()
	awaitHeld(t, gate)
	// The write in flight is held; everything below is queued behind it.
	if _, err := bulk.Write(randomBytes(200 << 10)); err != nil {
		t.Fatalf("bulk write: %v", err)
	}
	if err := bulk.CloseWrite(); err != nil {
		t.Fatalf("bulk close-write: %v", err)
	}
	if _, err := aborted.Write(randomBytes(100 << 10)); err != nil {
		t.Fatalf("aborted stream's write: %v", err)
	}
	aborted.Close() // not ended both ways: RST_STREAM CANCEL
	if _, err := small.Write([]byte("ping")); err != nil {
		t.Fatalf("small write: %v", err)
	}
	gate.setShut(false)

	if err := <-leadDone; err != nil {
		t.Fatalf("leading write: %v", err)
	}
	if pong := readWithin(t, small, 4); string(pong) != "ping" {
		t.Fatalf("small stream's echo: %q", pong)
	}
	lead.CloseWrite()
	for range 2 {
		select {
		case <-got:
		case <-time.After(wait):
			t.Fatal("the server did not read the bulk streams to their end")
		}
	}

	var firstBulk, firstSmall = -1, -1
	var bulkBytes, abortedBytes, abortedRST = 0, 0, -1
	bulkEnd := false
	for i, f := range tee.frames(t) {
		switch {
		case f.typ == http2.FrameData && f.id == bulk.ID():
			if bulkEnd {
				t.Errorf("frame %d: bulk stream DATA after its END_STREAM", i)
			}
			if firstBulk < 0 && f.n > 0 {
				firstBulk = i
			}
			bulkBytes += f.n
			bulkEnd = bulkEnd || f.end
		case f.typ == http2.FrameData && f.id == small.ID() && f.n > 0 && firstSmall < 0:
			firstSmall = i
		case f.typ == http2.FrameData && f.id == aborted.ID():
			if abortedRST >= 0 {
				t.Errorf("frame %d: DATA of the aborted stream after its RST_STREAM", i)
			}
			abortedBytes += f.n
		case f.typ == http2.FrameRSTStream && f.id == aborted.ID():
			abortedRST = i
		}
	}
	if firstSmall < 0 || firstBulk < 0 || firstSmall > firstBulk {
		t.Errorf("the request queued after the bulk data went out at frame %d, the bulk data at %d: it waited behind the bulk queue", firstSmall, firstBulk)
	}
	if bulkBytes != 200<<10 || !bulkEnd {
		t.Errorf("bulk stream: %d bytes, END_STREAM %v; want %d and its END_STREAM after them", bulkBytes, bulkEnd, 200<<10)
	}
	if abortedBytes != 100<<10 || abortedRST < 0 {
		t.Errorf("aborted stream: %d bytes, RST_STREAM at frame %d; want %d then the reset", abortedBytes, abortedRST, 100<<10)
	}
}

// TestSmallWriteDoesNotWaitForBulkRoom: a bulk transfer that filled its
// queue (the socket is not taking more: the write in flight is held) makes
// its own writes wait, not a request of another stream.
func TestSmallWriteDoesNotWaitForBulkRoom(t *testing.T) {
	client, gate, _ := gatedPair(t, Options{}, func(s *Stream) {
		if s.Authority() == "small:1" {
			echo(s)
			return
		}
		io.Copy(io.Discard, s)
	})
	lead, bulk, small := open(t, client, "lead:1"), open(t, client, "bulk:1"), open(t, client, "small:1")

	gate.setShut(true)
	leadDone := make(chan error, 1)
	go func() { _, err := lead.Write(randomBytes(64 << 10)); leadDone <- err }()
	awaitHeld(t, gate)
	bulkDone := make(chan error, 1)
	go func() {
		_, err := bulk.Write(randomBytes(1 << 20))
		if err == nil {
			err = bulk.CloseWrite()
		}
		bulkDone <- err
	}()
	deadline := time.Now().Add(wait)
	for {
		client.wmu.Lock()
		full := len(client.bbuf) >= maxWriteBuffer
		client.wmu.Unlock()
		if full {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the bulk queue never filled while the socket was held")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-bulkDone:
		t.Fatalf("the bulk write returned (%v) with its queue full and the socket held", err)
	default:
	}

	wrote := make(chan error, 1)
	go func() { _, err := small.Write([]byte("ping")); wrote <- err }()
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatalf("small write: %v", err)
		}
	case <-time.After(wait):
		gate.setShut(false)
		t.Fatal("a request's Write waited for room in the queue the bulk transfer filled")
	}
	gate.setShut(false)
	if err := <-leadDone; err != nil {
		t.Fatalf("leading write: %v", err)
	}
	if err := <-bulkDone; err != nil {
		t.Fatalf("bulk write after the socket was released: %v", err)
	}
	if pong := readWithin(t, small, 4); string(pong) != "ping" {
		t.Fatalf("small stream's echo: %q", pong)
	}
}

// TestStreamWindowDependsOnTheCompany: what a bulk sender may have in
// flight to an app that stopped reading. Alone on the connection, a stream
// that has carried a transfer gets its window grown to MaxStreamWindow
// (and never more); while another stream shares the connection it gets at
// most half of StreamWindow (its bytes would sit ahead of that stream's
// frames), also when it had grown before the other stream came.
func TestStreamWindowDependsOnTheCompany(t *testing.T) {
	const window, maxWindow = 256 << 10, 1 << 20
	const read = 1 << 20
	for _, tc := range []struct {
		name        string
		shared      bool // a second stream is open while the app reads
		grownBefore bool // the stream read alone before the second one opened
	}{{"alone", false, false}, {"shared", true, false}, {"grown, then shared", true, true}} {
		t.Run(tc.name, func(t *testing.T) {
			var written atomic.Int64
			client, _ := pair(t, Options{StreamWindow: window, MaxStreamWindow: maxWindow}, func(s *Stream) {
				if s.Authority() == "idle:1" {
					io.Copy(io.Discard, s)
					return
				}
				chunk := randomBytes(16 << 10)
				for {
					n, err := s.Write(chunk)
					written.Add(int64(n))
					if err != nil {
						return
					}
				}
			})
			down := open(t, client, "down:1")
			var total int64
			if tc.grownBefore {
				readWithin(t, down, read)
				total += read
			}
			if tc.shared {
				idle := open(t, client, "idle:1")
				defer idle.Close()
			}
			more := read
			if tc.grownBefore {
				more = 2 * maxWindow // past all the grown window let it send before the second stream opened
			}
			readWithin(t, down, more)
			total += int64(more)
			// The sender stops when the window runs out; wait for that
			// (alone, also until it is 3/4 of the grown window ahead: a
			// sender the loaded machine paused must not read as one held
			// back).
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			last, stable := written.Load(), time.Now()
			for time.Since(stable) < 300*time.Millisecond || !tc.shared && last-total < 3*maxWindow/4 {
				select {
				case <-ctx.Done():
					t.Fatalf("after %v the sender is %d bytes ahead of the app and has not settled (alone it should reach 3/4 of the grown window, %d)", wait, last-total, 3*maxWindow/4)
				case <-time.After(20 * time.Millisecond):
				}
				if w := written.Load(); w != last {
					last, stable = w, time.Now()
				}
			}
			inFlight := last - total
			if tc.shared && inFlight > window/2 {
				t.Errorf("sharing the connection, the sender got %d bytes ahead of the app; want at most half the stream window (%d)", inFlight, window/2)
			}
			if !tc.shared && inFlight > maxWindow {
				t.Errorf("alone on the connection, the sender got %d bytes ahead of the app; want at most MaxStreamWindow (%d)", inFlight, maxWindow)
			}
			t.Logf("in flight when the app stopped reading: %d bytes (window %d, grown %d)", inFlight, window, maxWindow)
		})
	}
}

// TestWindowOptions: a MaxStreamWindow below StreamWindow means no growth,
// and neither may exceed what HTTP/2 allows.
func TestWindowOptions(t *testing.T) {
	for _, tc := range []struct {
		in                Options
		stream, maxStream uint32
	}{
		{Options{}, DefaultStreamWindow, DefaultMaxStreamWindow},
		{Options{StreamWindow: 2 << 20, MaxStreamWindow: 1 << 20}, 2 << 20, 2 << 20},
		{Options{StreamWindow: 32 << 20}, 32 << 20, 32 << 20}, // above the default MaxStreamWindow
		{Options{StreamWindow: 3 << 30, MaxStreamWindow: 1 << 31}, MaxWindow, MaxWindow},
	} {
		got := tc.in.withDefaults()
		if got.StreamWindow != tc.stream || got.MaxStreamWindow != tc.maxStream {
			t.Errorf("%+v: windows %d / %d, want %d / %d", tc.in, got.StreamWindow, got.MaxStreamWindow, tc.stream, tc.maxStream)
		}
	}
}
