package hbone

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawClient is an HTTP/2 client written frame by frame, against a Conn
// serving on the other end of its socket.
type rawClient struct {
	nc net.Conn
	fr *http2.Framer
}

// rawServe serves on one end of a socket pair with handle behind each
// answered CONNECT and returns a raw client on the other end that has sent
// its preface and SETTINGS (with settings) and opened stream 1.
func rawServe(t *testing.T, handle func(*Stream), settings ...http2.Setting) *rawClient {
	t.Helper()
	cs, ss := tcpPair(t)
	serveOn(t, ss, Options{}, handle)
	t.Cleanup(func() { cs.Close() })
	c := &rawClient{nc: cs, fr: http2.NewFramer(cs, cs)}
	c.fr.AllowIllegalWrites = true // the tests send what a peer must not
	_ = cs.SetDeadline(time.Now().Add(wait))
	if _, err := io.WriteString(cs, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	_ = enc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
	_ = enc.WriteField(hpack.HeaderField{Name: ":authority", Value: "10.0.0.1:80"})
	if err := c.fr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	return c
}

// goAway reads frames until the server's GOAWAY and returns its code, or
// fails if the connection ends without one.
func (c *rawClient) goAway(t *testing.T) http2.ErrCode {
	t.Helper()
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatalf("connection ended without GOAWAY: %v", err)
		}
		if g, ok := f.(*http2.GoAwayFrame); ok {
			return g.ErrCode
		}
	}
}

// TestDataFramesAsSent: DATA frames of every shape — full and short,
// padded and not, longer than one piece (up to the size we advertise), an
// empty one that ends the stream and a long one that does — reach the
// stream's reader whole and in order (unpadded ones are read straight into
// the stream's buffer, maxFrame at a time; padded ones through the
// Framer).
func TestDataFramesAsSent(t *testing.T) {
	got := make(chan []byte, 1)
	c := rawServe(t, func(s *Stream) {
		b, _ := io.ReadAll(s)
		got <- b
	})
	var want []byte
	sendEnd := func(n, pad int, padded, end bool) {
		t.Helper()
		p := randomBytes(n)
		want = append(want, p...)
		var err error
		if padded {
			err = c.fr.WriteDataPadded(1, end, p, make([]byte, pad))
		} else {
			err = c.fr.WriteData(1, end, p)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	send := func(n, pad int, padded bool) { t.Helper(); sendEnd(n, pad, padded, false) }
	send(maxFrame, 0, false)
	send(100, 0, false)
	send(maxFrame-1-255, 255, true)
	send(5000, 0, true)
	send(maxFrame, 0, false)
	send(1, 0, false)
	send(maxReadFrame, 0, false)
	send(3*maxFrame+17, 0, false)
	send(100<<10, 200, true)
	send(maxFrame, 0, false)
	if err := c.fr.WriteData(1, true, nil); err != nil {
		t.Fatal(err)
	}
	readAll := func(what string) {
		t.Helper()
		select {
		case b := <-got:
			if !bytes.Equal(b, want) {
				t.Fatalf("%s read %d bytes, not the %d sent (or not in order)", what, len(b), len(want))
			}
		case <-time.After(wait):
			t.Fatalf("%s did not end", what)
		}
	}
	readAll("the stream")

	// A stream that a long frame ends.
	c = rawServe(t, func(s *Stream) {
		b, _ := io.ReadAll(s)
		got <- b
	})
	want = nil
	send(maxFrame+5, 0, false)
	sendEnd(2*maxFrame+9, 0, false, true)
	readAll("the stream a long frame ends")
}

// TestBadDataFrames: DATA that breaks the protocol ends the connection with
// GOAWAY(PROTOCOL_ERROR) — on stream 0, or on a stream never opened — and
// a frame above the size we advertised ends it at once.
func TestBadDataFrames(t *testing.T) {
	hold := func(s *Stream) { _, _ = io.Copy(io.Discard, s) }
	for _, id := range []uint32{0, 3} {
		c := rawServe(t, hold)
		if err := c.fr.WriteData(id, false, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if code := c.goAway(t); code != http2.ErrCodeProtocol {
			t.Errorf("DATA on stream %d: GOAWAY %v, want PROTOCOL_ERROR", id, code)
		}
	}

	c := rawServe(t, hold)
	// Written raw, from a goroutine: the server may close the connection
	// on the header, before the payload is all written.
	big := make([]byte, 9+maxReadFrame+1)
	n := maxReadFrame + 1
	big[0], big[1], big[2], big[3], big[8] = byte(n>>16), byte(n>>8), byte(n), byte(http2.FrameData), 1
	go func() { _, _ = c.nc.Write(big) }()
	for {
		if _, err := c.fr.ReadFrame(); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("a frame above the maximum size did not end the connection")
			}
			break
		}
	}
}

// TestDataFramesSentFitThePeer: a bulk stream's write chunk goes out as one
// DATA frame, its payload not copied into the queue, to a peer that allows
// frames that long (as a meshproxy peer does: maxReadFrame), and in frames
// of at most the default 16 KiB to one that allows no more; the bytes
// arrive whole either way.
func TestDataFramesSentFitThePeer(t *testing.T) {
	payload := randomBytes(maxWriteChunk + 100)
	for _, peerMax := range []uint32{maxFrame, maxReadFrame} {
		settings := []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 8 << 20}}
		if peerMax != maxFrame {
			settings = append(settings, http2.Setting{ID: http2.SettingMaxFrameSize, Val: peerMax})
		}
		c := rawServe(t, func(s *Stream) {
			// Write once the byte sent after the connection's
			// WINDOW_UPDATE is read: the server has the window by then.
			if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
				return
			}
			_, _ = s.Write(payload)
			_ = s.CloseWrite()
			_, _ = io.Copy(io.Discard, s)
		}, settings...)
		if err := c.fr.WriteWindowUpdate(0, 8<<20); err != nil {
			t.Fatal(err)
		}
		if err := c.fr.WriteData(1, false, []byte{0}); err != nil {
			t.Fatal(err)
		}
		c.fr.SetMaxReadFrameSize(maxReadFrame) // to see what the server sent, not to refuse it
		var got []byte
		var sizes []int
		for end := false; !end; {
			f, err := c.fr.ReadFrame()
			if err != nil {
				t.Fatalf("peer allowing %d-byte frames: %v after %d bytes", peerMax, err, len(got))
			}
			if d, ok := f.(*http2.DataFrame); ok {
				got = append(got, d.Data()...)
				sizes = append(sizes, len(d.Data()))
				end = d.StreamEnded()
			}
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("peer allowing %d-byte frames: read %d bytes, not the %d written (or not in order)", peerMax, len(got), len(payload))
		}
		for i, n := range sizes {
			if n > int(peerMax) {
				t.Fatalf("peer allowing %d-byte frames: frame %d carries %d bytes", peerMax, i, n)
			}
		}
		if peerMax == maxReadFrame && sizes[0] != maxWriteChunk {
			t.Errorf("peer allowing %d-byte frames: the first frame carries %d bytes, want the whole %d-byte chunk (sizes %v)", peerMax, sizes[0], maxWriteChunk, sizes)
		}
	}
}
