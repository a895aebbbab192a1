package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/meshproxy/meshproxy/proxy/forward"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// These tests run streams as the proxy does: each side's app socket is
// forwarded to its stream with forward.Forward, so the stream's receive
// direction is pushed (PushTo: the connection's reader writes to the app
// socket itself when it can) on both sides.

// fwd forwards down (the accepted side) and up until both directions end.
func fwd(down, up net.Conn) {
	abort := func() { down.Close(); up.Close() }
	counter := prometheus.NewCounter(prometheus.CounterOpts{Name: "bytes"})
	_ = forward.Forward(down, up, &forward.Stats{}, time.Minute, abort, counter)
}

// forwardedPair is pair whose server dials the stream's :authority (an app
// listener) and forwards the stream to it.
func forwardedPair(t *testing.T) *Conn {
	t.Helper()
	cs, ss := tcpPair(t)
	return forwardedPairOn(t, cs, ss, Options{}, Options{})
}

// forwardedPairOn is forwardedPair on the given sockets and options.
func forwardedPairOn(t *testing.T, cs, ss net.Conn, copts, sopts Options) *Conn {
	t.Helper()
	server := NewServer(ss, sopts)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(func(s *Stream) {
			up, err := net.Dial("tcp", s.Authority())
			if err != nil {
				s.Close()
				return
			}
			// A small send buffer: an app that reads slowly soon makes
			// the reader's writes to it fall back to the stream's queue.
			_ = up.(*net.TCPConn).SetWriteBuffer(16 << 10)
			if err := s.Respond(http.StatusOK); err != nil {
				up.Close()
				s.Close()
				return
			}
			fwd(s, up)
		})
	}()
	client := NewClient(cs, copts)
	t.Cleanup(func() {
		client.Close()
		server.Close()
		<-served
	})
	return client
}

// appListener starts an app running handle and returns its address.
func appListener(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	return proxytest.StartApp(t, 2*wait, handle).Addr()
}

// dialApp opens a stream to authority and returns the client app's end of
// a socket forwarded over it.
func dialApp(t *testing.T, c *Conn, authority string) *net.TCPConn {
	t.Helper()
	s := open(t, c, authority)
	app, down := tcpPair(t)
	go fwd(down, s)
	_ = app.SetDeadline(time.Now().Add(wait)) // a stall fails the test rather than hanging it
	return app.(*net.TCPConn)
}

// exchange sends payload on app, half-closes, and checks that the echo
// is payload exactly, then EOF.
func exchange(app halfCloser, payload []byte) error {
	go func() {
		_, _ = app.Write(payload)
		_ = app.CloseWrite()
	}()
	h := sha256.New()
	n, err := io.Copy(h, app)
	if err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if want := sha256.Sum256(payload); n != int64(len(payload)) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("echo of %d bytes differs (got %d)", len(payload), n)
	}
	return nil
}

// Bytes are exact, in order, and end with the end of stream, whatever the
// sizes and however slowly the app reads (slow reads make the reader's
// writes fall back to the queue part way through a stream).
func TestPushedStreamsExactUnderLoad(t *testing.T) {
	fast := appListener(t, proxytest.Echo)
	slow := appListener(t, func(c net.Conn) {
		r := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, 4<<10)
		var got []byte
		for {
			n, err := c.Read(buf[:1+r.IntN(len(buf))])
			got = append(got, buf[:n]...)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return
			}
		}
		if _, err := c.Write(got); err == nil {
			_ = forward.CloseWrite(c)
		}
	})
	c := forwardedPair(t)
	open(t, c, fast) // the stream that rides with the preface
	const streams = 24
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Go(func() {
			size := rand.IntN(3 << 20)
			if i%6 == 0 {
				size = rand.IntN(2 << 10)
			}
			app := fast
			if i%3 == 0 {
				app = slow
			}
			if err := exchange(dialApp(t, c, app), randomBytes(size)); err != nil {
				errs <- fmt.Errorf("stream %d (%d bytes): %w", i, size, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// An app that does not read fills its socket; the connection's reader
// must then queue that stream's data rather than wait, so the other
// streams of the connection keep flowing; once the app reads, it gets
// every byte, then the end of stream.
func TestPushToStuckAppDoesNotStallOthers(t *testing.T) {
	release := make(chan struct{})
	received := make(chan []byte, 1)
	stuck := appListener(t, func(c net.Conn) {
		<-release
		got, err := io.ReadAll(c)
		if err != nil {
			got = append(got, "<error: "+err.Error()+">"...)
		}
		received <- got
	})
	echoApp := appListener(t, proxytest.Echo)
	c := forwardedPair(t)
	open(t, c, echoApp)

	a := dialApp(t, c, stuck)
	big := randomBytes(900 << 10) // far more than the stuck app's socket holds, less than the stream window
	if _, err := a.Write(big); err != nil {
		t.Fatal(err)
	}
	if err := a.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		if err := exchange(dialApp(t, c, echoApp), randomBytes(1<<20+i)); err != nil {
			t.Fatalf("stream beside a stuck app: %v", err)
		}
	}
	close(release)
	expectReceived(t, received, big, "the stuck app")
}

// Half-close both ways through forwarded streams: the client app ends
// first and the server app answers at length; the server app ends first
// (a banner) and the client app sends at length after it.
func TestPushedHalfCloseBothWays(t *testing.T) {
	answerer := appListener(t, func(c net.Conn) { answerAtLength(c.(*net.TCPConn), 1000) })
	received := make(chan []byte, 1)
	banner := appListener(t, func(c net.Conn) { bannerThenReadAll(c.(*net.TCPConn), received) })
	c := forwardedPair(t)

	sendThenReadAnswer(t, dialApp(t, c, answerer), 1000)
	sendAfterBanner(t, dialApp(t, c, banner), received)
}

// TestDeferredFlushesDeliverEverything: over mesh TLS with a CorkConn
// (where the reader defers a lone stream's bulk data and writes it to the
// app itself, see flushBatch), streams stay exact — the forwarders' small
// socket buffers make the reader's writes stop part way; a burst smaller
// than a batch that nothing follows reaches the app at once (the reader
// flushes before it waits for the socket), and so does one that stops
// while another stream keeps the reader busy.
func TestDeferredFlushesDeliverEverything(t *testing.T) {
	client, server, ccork, scork := corkedTLSPair(t)
	c := forwardedPairOn(t, client, server, Options{Cork: ccork}, Options{Cork: scork})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.WaitSettings(ctx); err != nil { // the server's stream limit
		t.Fatal(err)
	}

	echoApp := appListener(t, proxytest.Echo)
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := exchange(dialApp(t, c, echoApp), randomBytes(1<<20+i*4099)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()

	const burst = flushBatch / 2
	burstApp := appListener(t, func(a net.Conn) { // a burst, then nothing until the client leaves
		_, _ = a.Write(randomBytes(burst))
		_, _ = io.Copy(io.Discard, a)
	})
	streamApp := appListener(t, func(a net.Conn) { // sends until the client leaves, at most 20 s
		buf := randomBytes(64 << 10)
		for end := time.Now().Add(20 * time.Second); time.Now().Before(end); {
			if _, err := a.Write(buf); err != nil {
				return
			}
		}
	})
	readBurst := func(what string) {
		t.Helper()
		a := dialApp(t, c, burstApp)
		defer a.Close()
		_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := io.ReadFull(a, make([]byte, burst)); err != nil {
			t.Errorf("%s: the app got %d of the %d-byte burst: %v", what, n, burst, err)
		}
	}
	readBurst("alone")

	// An app that does not read for a while: the reader's writes stop part
	// way (its socket is full) and the forwarder writes the rest.
	big := randomBytes(8 << 20)
	bigApp := appListener(t, func(a net.Conn) {
		_, _ = a.Write(big)
		_ = a.Close()
	})
	late := dialApp(t, c, bigApp)
	time.Sleep(200 * time.Millisecond)
	if got, err := io.ReadAll(late); err != nil || !bytes.Equal(got, big) {
		t.Errorf("an app that read late got %d of %d bytes (%v), or not in order", len(got), len(big), err)
	}
	late.Close()

	busy := dialApp(t, c, streamApp)
	defer busy.Close()
	go func() { _, _ = io.Copy(io.Discard, busy) }()
	readBurst("beside a stream that keeps the reader busy")
}

// TestEndAfterADeferredFlushReachesTheApp: a stream alone on its
// connection receives full frames (the reader defers them: see flushBatch)
// and its END_STREAM in one read; the forwarder, woken by the END, finds
// the reader flushing the frames and waits for it. The reader must wake it
// when it is done although it leaves nothing buffered, or the app never
// sees the half-close (the stream hung so, rarely, under load). One Go
// processor, and the reader yielding as its write starts, make that
// interleaving certain.
func TestEndAfterADeferredFlushReachesTheApp(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var flushes atomic.Int64
	flushWriteHook = func() { flushes.Add(1); runtime.Gosched() }
	defer func() { flushWriteHook = nil }()

	ctls, stls, _, scork := corkedTLSPair(t)
	app, appEnd := tcpPair(t)
	served := make(chan error, 1)
	serveOn(t, stls, Options{Cork: scork}, func(s *Stream) {
		defer s.Close()
		err := s.PushTo(appEnd, func(int64) {})
		if err == nil {
			err = appEnd.(*net.TCPConn).CloseWrite()
		}
		served <- err
	})
	c := &rawClient{nc: ctls, fr: http2.NewFramer(ctls, ctls)}
	_ = ctls.SetDeadline(time.Now().Add(wait))
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	_ = enc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
	_ = enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	if _, err := io.WriteString(ctls, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	for { // the answer: the handler runs, PushTo is about to wait
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := f.(*http2.MetaHeadersFrame); ok {
			break
		}
		if _, ok := f.(*http2.HeadersFrame); ok {
			break
		}
	}
	time.Sleep(50 * time.Millisecond)

	// Four full frames and the END, in one write.
	const frames = 4
	payload := randomBytes(frames * maxFrame)
	var out bytes.Buffer
	fr := http2.NewFramer(&out, nil)
	for i := range frames {
		if err := fr.WriteData(1, false, payload[i*maxFrame:(i+1)*maxFrame]); err != nil {
			t.Fatal(err)
		}
	}
	if err := fr.WriteData(1, true, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := ctls.Write(out.Bytes()); err != nil {
		t.Fatal(err)
	}

	_ = app.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(app)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("the app read %d of %d bytes and then %v: the end of the stream never reached it (deferred flushes: %d)", len(got), len(payload), err, flushes.Load())
	}
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	if flushes.Load() == 0 {
		t.Fatal("the reader never flushed deferred frames: the test did not take the path it is about")
	}
}

// TestSinkStaysSmall: every pushed stream — each app connection a sidecar
// holds — keeps a sink; the vector for the reader's bulk flushes is made on
// the first flush, not carried by every sink (64 entries of it were 1.5 KB
// of each held connection's memory).
func TestSinkStaysSmall(t *testing.T) {
	if n := unsafe.Sizeof(sink{}); n > 192 {
		t.Errorf("a sink is %d bytes; a held connection should not carry more than 192 of them", n)
	}
}
