//lint:file-ignore SA1019 the interop tests use x/net/http2's own client and server, as Istio's HBONE peers do

package hbone

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"golang.org/x/net/http2"
)

const wait = 30 * time.Second // generous: the machine is shared and loaded

// pair connects a client Conn to a server Conn over loopback TCP; the
// server answers 200 to every CONNECT and runs handle on the stream.
func pair(t *testing.T, opts Options, handle func(*Stream)) (*Conn, *Conn) {
	t.Helper()
	cs, ss := tcpPair(t)
	return pairOver(t, cs, ss, opts, handle)
}

// pairOver is pair on the given client and server sockets.
func pairOver(t *testing.T, cs, ss net.Conn, opts Options, handle func(*Stream)) (*Conn, *Conn) {
	t.Helper()
	server := serveOn(t, ss, opts, handle)
	client := NewClient(cs, opts)
	t.Cleanup(func() { client.Close() })
	return client, server
}

// serveOn serves HBONE on ss until the test ends, answering 200 to every
// CONNECT and running handle on the stream.
func serveOn(t *testing.T, ss net.Conn, opts Options, handle func(*Stream)) *Conn {
	t.Helper()
	server := NewServer(ss, opts)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(func(s *Stream) {
			defer s.Close()
			if s.Method() != http.MethodConnect {
				s.SetFailStatus(http.StatusMethodNotAllowed)
				return
			}
			if err := s.Respond(http.StatusOK); err != nil {
				return
			}
			handle(s)
		})
	}()
	t.Cleanup(func() {
		server.Close()
		<-served
	})
	return server
}

func tcpPair(t testing.TB) (net.Conn, net.Conn) {
	c, s := loopback.TCPPair(t)
	return c, s
}

func open(t *testing.T, c *Conn, authority string) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	s, err := c.Open(ctx, authority)
	if err != nil {
		t.Fatalf("open %s: %v", authority, err)
	}
	if s.Status() != http.StatusOK {
		t.Fatalf("open %s: status %d", authority, s.Status())
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// echo copies the stream back to itself and ends its direction after the
// client's end.
func echo(s *Stream) {
	if _, err := io.Copy(s, s); err != nil {
		return
	}
	_ = s.CloseWrite()
	_, _ = io.Copy(io.Discard, s)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(n), byte(n >> 8), byte(n >> 16)})
	_, _ = r.Read(b)
	return b
}

func TestClientHalfCloseThenServerKeepsSending(t *testing.T) {
	c, _ := pair(t, Options{}, func(s *Stream) { answerAtLength(s, 100) })
	sendThenReadAnswer(t, open(t, c, "10.0.0.1:80"), 100)
}

// answerAtLength is an app that reads to the end of the client's
// direction, then answers in lines and ends its own.
func answerAtLength(c halfCloser, lines int) {
	n, err := io.Copy(io.Discard, c) // until the client's end of stream
	if err != nil {
		return
	}
	for i := range lines { // then answer at length
		if _, err := fmt.Fprintf(c, "line %d of the answer to %d bytes\n", i, n); err != nil {
			return
		}
	}
	_ = c.CloseWrite()
}

// sendThenReadAnswer sends 300 KiB to answerAtLength, ends its direction
// and checks the answer read after that.
func sendThenReadAnswer(t *testing.T, c halfCloser, lines int) {
	t.Helper()
	if _, err := c.Write(randomBytes(300 << 10)); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read answer after our half-close: %v", err)
	}
	var want bytes.Buffer
	for i := range lines {
		fmt.Fprintf(&want, "line %d of the answer to %d bytes\n", i, 300<<10)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("answer differs: got %d bytes, want %d", len(got), want.Len())
	}
}

// The app behind the server ends its direction first (a banner, then
// close); what the client sends after that must still reach it.
func TestServerHalfCloseThenClientKeepsSending(t *testing.T) {
	received := make(chan []byte, 1)
	c, _ := pair(t, Options{}, func(s *Stream) { bannerThenReadAll(s, received) })
	sendAfterBanner(t, open(t, c, "10.0.0.1:25"), received)
}

// halfCloser is a connection whose direction can be ended on its own.
type halfCloser interface {
	io.ReadWriter
	CloseWrite() error
}

// bannerThenReadAll is an app that speaks first and ends its direction,
// then reads everything to the end and hands it over.
func bannerThenReadAll(c halfCloser, received chan<- []byte) {
	if _, err := io.WriteString(c, "220 banner\r\n"); err != nil {
		return
	}
	if err := c.CloseWrite(); err != nil {
		return
	}
	got, err := io.ReadAll(c)
	if err != nil {
		got = append(got, "<error: "+err.Error()+">"...)
	}
	received <- got
}

// sendAfterBanner reads bannerThenReadAll's banner to its end, then sends
// 2 MiB and checks that the app got all of it.
func sendAfterBanner(t *testing.T, c halfCloser, received <-chan []byte) {
	t.Helper()
	banner, err := io.ReadAll(c) // the server's end of stream ends our reads
	if err != nil || string(banner) != "220 banner\r\n" {
		t.Fatalf("banner %q, %v", banner, err)
	}
	payload := randomBytes(2<<20 + 5)
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write after the server's half-close: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	expectReceived(t, received, payload, "the server app (data sent after its half-close)")
}

// expectReceived waits for what an app read until its end of stream (sent
// on received) and checks that it is want; who names the app.
func expectReceived(t *testing.T, received <-chan []byte, want []byte, who string) {
	t.Helper()
	select {
	case got := <-received:
		if !bytes.Equal(got, want) {
			t.Fatalf("%s got %d bytes, want %d identical", who, len(got), len(want))
		}
	case <-time.After(wait):
		t.Fatalf("%s never got its data and end of stream", who)
	}
}

func TestManyConcurrentStreamsRandomSizes(t *testing.T) {
	c, _ := pair(t, Options{StreamWindow: 64 << 10}, echo) // small windows: many WINDOW_UPDATEs
	open(t, c, "10.0.0.0:80")                              // the stream that rides with the preface
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.WaitSettings(ctx); err != nil { // the server's stream limit
		t.Fatal(err)
	}
	const streams = 48
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := range streams {
		wg.Go(func() {
			size := rand.IntN(1 << 20)
			if i%8 == 0 {
				size = rand.IntN(64)
			}
			payload := randomBytes(size)
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			s, err := c.Open(ctx, fmt.Sprintf("10.0.0.%d:80", i))
			if err != nil {
				errs <- err
				return
			}
			defer s.Close()
			if err := exchange(s, payload); err != nil {
				errs <- fmt.Errorf("stream %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClientCloseResetsServerStream(t *testing.T) {
	got := make(chan error, 1)
	c, _ := pair(t, Options{}, func(s *Stream) {
		_, err := io.Copy(io.Discard, s)
		got <- err
	})
	s := open(t, c, "10.0.0.1:80")
	if _, err := s.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	s.Close() // an abort: no END_STREAM
	select {
	case err := <-got:
		var re *ResetError
		if !errors.As(err, &re) || re.Code != http2.ErrCodeCancel {
			t.Fatalf("server read ended with %v, want a CANCEL reset", err)
		}
	case <-time.After(wait):
		t.Fatal("server read never ended")
	}
}

func TestServerCloseResetsClientStream(t *testing.T) {
	c, _ := pair(t, Options{}, func(s *Stream) {
		_, _ = io.WriteString(s, "half an answer")
		// returning closes the stream without END_STREAM: an abort
	})
	s := open(t, c, "10.0.0.1:80")
	_, err := io.ReadAll(s)
	var re *ResetError
	if !errors.As(err, &re) {
		t.Fatalf("read ended with %v, want a reset, never a clean EOF", err)
	}
}

func TestGoAwayDrainsStreamsInFlight(t *testing.T) {
	release := make(chan struct{})
	c, server := pair(t, Options{}, func(s *Stream) {
		<-release
		echo(s)
	})
	const inFlight = 5
	streams := make([]*Stream, inFlight)
	for i := range streams {
		streams[i] = open(t, c, "10.0.0.1:80")
	}
	server.Shutdown()
	deadline := time.Now().Add(wait)
	for c.Available() > 0 { // the GOAWAY reaches the client
		if time.Now().After(deadline) {
			t.Fatal("client never saw the GOAWAY")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := c.Open(context.Background(), "10.0.0.1:80"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("open after GOAWAY: %v, want ErrUnavailable", err)
	}
	close(release)
	var wg sync.WaitGroup
	for i, s := range streams {
		wg.Go(func() {
			payload := randomBytes(100<<10 + i)
			go func() {
				_, _ = s.Write(payload)
				_ = s.CloseWrite()
			}()
			got, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(got, payload) {
				t.Errorf("stream %d in flight at GOAWAY: %d bytes, %v", i, len(got), err)
			}
			s.Close()
		})
	}
	wg.Wait()
	select {
	case <-server.Done():
	case <-time.After(wait):
		t.Fatal("server connection still open after its last stream")
	}
}

func TestStreamNotReadDoesNotStallOthers(t *testing.T) {
	stuck := make(chan struct{})
	c, _ := pair(t, Options{StreamWindow: 64 << 10}, func(s *Stream) {
		if s.Authority() == "stuck:1" {
			<-stuck // never reads
			return
		}
		echo(s)
	})
	defer close(stuck)
	a := open(t, c, "stuck:1")
	writeDone := make(chan error, 1)
	go func() {
		_, err := a.Write(randomBytes(1 << 20)) // far past the window: blocks
		writeDone <- err
	}()

	b := open(t, c, "echo:1")
	payload := randomBytes(4 << 20)
	go func() {
		_, _ = b.Write(payload)
		_ = b.CloseWrite()
	}()
	got, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("stream beside a stuck one: %d bytes, %v", len(got), err)
	}
	select {
	case err := <-writeDone:
		t.Fatalf("write to a stream that is not read returned early: %v", err)
	default:
	}
	a.Close()
	select {
	case err := <-writeDone:
		if err == nil {
			t.Fatal("write to a closed stream succeeded")
		}
	case <-time.After(wait):
		t.Fatal("write blocked on the window did not return after Close")
	}
}

func TestServerRefusesPastMaxStreams(t *testing.T) {
	hold := make(chan struct{})
	c, _ := pair(t, Options{MaxStreams: 2}, func(s *Stream) { <-hold; echo(s) })
	defer close(hold)
	open(t, c, "a:1")
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.WaitSettings(ctx); err != nil {
		t.Fatal(err)
	}
	open(t, c, "b:1")
	if n := c.Available(); n != 0 {
		t.Fatalf("available %d with 2 of 2 streams open", n)
	}
	if _, err := c.Open(ctx, "c:1"); !errors.Is(err, ErrFull) {
		t.Fatalf("third stream: %v, want ErrFull", err)
	}
}

// TestStandardClientInterop speaks to the server with x/net/http2's own
// client, as Istio's HBONE peers do: CONNECT, data both ways, half-close,
// and a refused method.
func TestStandardClientInterop(t *testing.T) {
	cs, ss := tcpPair(t)
	server := NewServer(ss, Options{})
	go func() {
		_ = server.Serve(func(s *Stream) {
			defer s.Close()
			if s.Method() != http.MethodConnect {
				s.SetFailStatus(http.StatusMethodNotAllowed)
				return
			}
			if s.Authority() != "10.0.0.9:8080" {
				s.SetFailStatus(http.StatusForbidden)
				return
			}
			if s.Respond(http.StatusOK) == nil {
				echo(s)
			}
		})
	}()
	t.Cleanup(func() { server.Close() })
	cc, err := (&http2.Transport{}).NewClientConn(cs)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	do := func(method, authority string, body io.Reader) *http.Response {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		t.Cleanup(cancel)
		req, err := http.NewRequestWithContext(ctx, method, "http://"+authority, body)
		if err != nil {
			t.Fatal(err)
		}
		if method == http.MethodConnect {
			req.URL = &url.URL{Host: authority}
		}
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, authority, err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	pr, pw := io.Pipe()
	resp := do(http.MethodConnect, "10.0.0.9:8080", pr)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT status %d", resp.StatusCode)
	}
	payload := randomBytes(1<<20 + 3)
	go func() {
		_, _ = pw.Write(payload)
		pw.Close() // END_STREAM
	}()
	got, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo over CONNECT: %d bytes, %v", len(got), err)
	}
	if r := do(http.MethodConnect, "10.0.0.10:22", http.NoBody); r.StatusCode != http.StatusForbidden {
		t.Fatalf("refused CONNECT: status %d", r.StatusCode)
	}
	if r := do(http.MethodGet, "10.0.0.9:8080", nil); r.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("GET: status %d", r.StatusCode)
	}
}

// TestStandardServerInterop opens streams with our client on x/net/http2's
// own server.
func TestStandardServerInterop(t *testing.T) {
	cs, ss := tcpPair(t)
	h2s := &http2.Server{}
	go h2s.ServeConn(ss, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})})
	c := NewClient(cs, Options{})
	defer c.Close()
	s := open(t, c, "10.0.0.9:8080")
	payload := randomBytes(1<<20 + 7)
	go func() {
		_, _ = s.Write(payload)
		_ = s.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo through x/net's server: %d bytes, %v", len(got), err)
	}
}

// A peer that stops answering without closing (no FIN, no RST) is found by
// the keepalive, and streams waiting on it fail instead of hanging.
func TestKeepAliveClosesSilentPeer(t *testing.T) {
	cs, ss := tcpPair(t)
	// The "server" reads the preface and then nothing: it never answers.
	go func() { _, _ = io.Copy(io.Discard, io.LimitReader(ss, 1<<20)) }()
	c := NewClient(cs, Options{KeepAlive: 50 * time.Millisecond})
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if _, err := c.Open(ctx, "10.0.0.1:80"); err == nil {
		t.Fatal("a stream opened on a silent peer")
	}
	select {
	case <-c.Done():
	case <-time.After(wait):
		t.Fatal("connection to a silent peer still open")
	}
}

// A refusal carries the server's reason in DecisionHeader, both when the
// handler closes the stream unanswered and when it answers an error; a
// refusal without a reason carries none, and 200 never does.
func TestRefusalCarriesItsReason(t *testing.T) {
	cs, ss := tcpPair(t)
	server := NewServer(ss, Options{})
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = server.Serve(func(s *Stream) {
			defer s.Close()
			switch s.Authority() {
			case "10.0.0.1:80": // refused by closing unanswered
				s.SetFailStatus(http.StatusForbidden)
				s.SetFailReason("bad_destination")
			case "10.0.0.2:80": // refused by answering
				s.SetFailReason("denied_by_policy")
				_ = s.Respond(http.StatusForbidden)
			case "10.0.0.3:80": // no reason given
				s.SetFailStatus(http.StatusForbidden)
			default:
				s.SetFailReason("not sent with 200")
				_ = s.Respond(http.StatusOK)
			}
		})
	}()
	client := NewClient(cs, Options{})
	t.Cleanup(func() { client.Close(); server.Close(); <-served })
	for _, tt := range []struct {
		authority, reason string
		status            int
	}{
		{"10.0.0.1:80", "bad_destination", http.StatusForbidden},
		{"10.0.0.2:80", "denied_by_policy", http.StatusForbidden},
		{"10.0.0.3:80", "", http.StatusForbidden},
		{"10.0.0.4:80", "", http.StatusOK},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		s, err := client.Open(ctx, tt.authority)
		cancel()
		if err != nil {
			t.Fatalf("CONNECT %s: %v", tt.authority, err)
		}
		if s.Status() != tt.status || s.FailReason() != tt.reason {
			t.Errorf("CONNECT %s: %d %q, want %d %q", tt.authority, s.Status(), s.FailReason(), tt.status, tt.reason)
		}
		s.Close()
	}
}
