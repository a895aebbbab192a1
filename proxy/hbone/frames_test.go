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
// its preface and SETTINGS and opened stream 1.
func rawServe(t *testing.T, handle func(*Stream)) *rawClient {
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
	if err := c.fr.WriteSettings(); err != nil {
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
// padded and not, an empty one that ends the stream — reach the stream's
// reader whole and in order (unpadded ones are read straight into the
// stream's buffer, padded ones through the Framer).
func TestDataFramesAsSent(t *testing.T) {
	got := make(chan []byte, 1)
	c := rawServe(t, func(s *Stream) {
		b, _ := io.ReadAll(s)
		got <- b
	})
	var want []byte
	send := func(n, pad int, padded bool) {
		t.Helper()
		p := randomBytes(n)
		want = append(want, p...)
		var err error
		if padded {
			err = c.fr.WriteDataPadded(1, false, p, make([]byte, pad))
		} else {
			err = c.fr.WriteData(1, false, p)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	send(maxFrame, 0, false)
	send(100, 0, false)
	send(maxFrame-1-255, 255, true)
	send(5000, 0, true)
	send(maxFrame, 0, false)
	send(1, 0, false)
	send(maxFrame, 0, false)
	if err := c.fr.WriteData(1, true, nil); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, want) {
			t.Fatalf("the stream read %d bytes, not the %d sent (or not in order)", len(b), len(want))
		}
	case <-time.After(wait):
		t.Fatal("the stream did not end")
	}
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
	if err := c.fr.WriteData(1, false, make([]byte, maxFrame+1)); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := c.fr.ReadFrame(); err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("a frame above the maximum size did not end the connection")
			}
			break
		}
	}
}
