package sniff

import (
	"bytes"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"time"
)

// FuzzSniff feeds arbitrary first bytes to Sniff from a peer that sends
// them in small segments and then closes. Whatever the bytes, Sniff must
// decide without a timeout, never lose or alter a byte (the returned Conn
// replays exactly what the peer sent), classify by the ALPN it parsed, and
// refuse only with a sentinel error. Seeds: testdata/fuzz/FuzzSniff.
func FuzzSniff(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		c := &segmentedConn{r: bytes.NewReader(data), segment: 1 + len(data)%64}
		sc, res, err := Sniff(c, 10*time.Second)
		if sc == nil {
			t.Fatal("Sniff returned a nil Conn")
		}
		replayed, rerr := io.ReadAll(sc)
		if rerr != nil {
			t.Fatalf("reading the sniffed conn: %v", rerr)
		}
		if !bytes.Equal(replayed, data) {
			t.Fatalf("replay lost or altered bytes: sent %d, replayed %d", len(data), len(replayed))
		}

		if err != nil {
			if !errors.Is(err, ErrBadHello) && !errors.Is(err, ErrHelloTooLarge) {
				t.Fatalf("refusal %v is neither ErrBadHello nor ErrHelloTooLarge", err)
			}
			if len(data) == 0 || data[0] != recordTypeHandshake {
				t.Fatalf("non-TLS first byte refused: %v", err)
			}
			return
		}
		mesh := slices.ContainsFunc(res.ALPN, IsMeshALPN)
		switch res.Kind {
		case Plaintext:
			if res.SNI != "" || len(res.ALPN) != 0 {
				t.Fatalf("plaintext with hello fields: %+v", res)
			}
			if len(data) >= 3 && data[0] == recordTypeHandshake && data[1] == 3 {
				t.Fatalf("a TLS handshake record header classified as plaintext")
			}
		case TLS, MeshTLS:
			if len(data) < recordHeaderLen || data[0] != recordTypeHandshake {
				t.Fatalf("%v without a TLS handshake record", res.Kind)
			}
			if mesh != (res.Kind == MeshTLS) {
				t.Fatalf("kind %v with ALPN %q", res.Kind, res.ALPN)
			}
		default:
			t.Fatalf("unknown kind %v", res.Kind)
		}
	})
}

// segmentedConn is a peer that has sent data, delivered at most segment
// bytes a read, and then closed its side (reads end in io.EOF).
type segmentedConn struct {
	net.Conn // nil: only the methods below are used
	r        *bytes.Reader
	segment  int
}

func (c *segmentedConn) Read(p []byte) (int, error) {
	if len(p) > c.segment {
		p = p[:c.segment]
	}
	return c.r.Read(p)
}

func (c *segmentedConn) SetReadDeadline(time.Time) error { return nil }
func (c *segmentedConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 15006}
}
func (c *segmentedConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40000}
}
