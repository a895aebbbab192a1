package sniff

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/internal/rawsock"
)

// DefaultTimeout is how long Sniff waits for the first bytes (and a whole
// ClientHello) before deciding.
const DefaultTimeout = 5 * time.Second

// MaxHelloSize is the largest ClientHello accepted: one TLS record's payload.
const MaxHelloSize = 16 << 10

const (
	recordHeaderLen     = 5
	recordTypeHandshake = 0x16
	firstReadSize       = 2048
)

// Sentinel errors; callers branch on them to pick a refusal reason.
var (
	// ErrHelloTooLarge means the ClientHello does not fit in MaxHelloSize.
	ErrHelloTooLarge = errors.New("tls client hello larger than 16 KiB")
	// ErrTimeout means a ClientHello had started but was incomplete at the
	// detect timeout.
	ErrTimeout = errors.New("tls client hello incomplete at detect timeout")
	// ErrBadHello means the bytes framed as a TLS handshake record but did not
	// parse as a ClientHello, or the peer closed mid-hello.
	ErrBadHello = errors.New("malformed tls client hello")
)

// errSniffed aborts the throwaway handshake once the hello is captured.
var errSniffed = errors.New("sniff: client hello captured")

// Kind is what a connection's first bytes looked like.
type Kind int

// The kinds Sniff distinguishes.
const (
	Plaintext Kind = iota // not TLS, or silent until the timeout
	TLS                   // a ClientHello without an Istio ALPN: the app's own TLS
	MeshTLS               // a ClientHello offering an istio* ALPN
)

// String returns the kind as used in metric labels: "plaintext", "tls", "mtls".
func (k Kind) String() string {
	switch k {
	case Plaintext:
		return "plaintext"
	case TLS:
		return "tls"
	case MeshTLS:
		return "mtls"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Result describes a sniffed connection.
type Result struct {
	Kind Kind
	SNI  string   // server name from the ClientHello ("" if none or not TLS)
	ALPN []string // protocols offered in the ClientHello
}

// IsMeshALPN reports whether an ALPN protocol is one of Istio's mesh
// protocols ("istio", "istio-http/1.1", "istio-h2", "istio-peer-exchange", …).
func IsMeshALPN(proto string) bool { return strings.HasPrefix(proto, "istio") }

// Conn is a net.Conn that first replays the bytes Sniff consumed.
type Conn struct {
	net.Conn
	buf  []byte        // consumed but not yet replayed
	sock io.ReadWriter // the socket's reads and writes (rawsock's for a plain socket)
}

// Read returns replayed bytes first, then reads from the network.
func (c *Conn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		if len(c.buf) == 0 {
			c.buf = nil
		}
		return n, nil
	}
	if c.sock == nil {
		return c.Conn.Read(p)
	}
	return c.sock.Read(p)
}

// ReadNow is Read without waiting for the network: replayed bytes, else
// what the socket holds now; rawsock.ErrWouldBlock when there is nothing
// (or the socket cannot be read without waiting).
func (c *Conn) ReadNow(p []byte) (int, error) {
	if len(c.buf) > 0 {
		return c.Read(p)
	}
	return rawsock.ReadNow(c.sock, p)
}

// Write writes to the network.
func (c *Conn) Write(p []byte) (int, error) {
	if c.sock == nil {
		return c.Conn.Write(p)
	}
	return c.sock.Write(p)
}

// Buffered returns how many sniffed bytes are still waiting to be replayed.
func (c *Conn) Buffered() int { return len(c.buf) }

// CloseWrite half-closes the underlying connection if it supports that.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return fmt.Errorf("half-close unsupported on %T", c.Conn)
}

// NetConn returns the wrapped connection.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// Sniff reads the first bytes of c, waiting at most timeout (DefaultTimeout
// if zero) for them and for a complete ClientHello, and classifies the
// connection. The returned Conn is never nil and replays everything read;
// use it instead of c from now on. On error (ErrHelloTooLarge, ErrTimeout,
// ErrBadHello, or a read error) the connection should be refused.
// Sniff clears c's read deadline before returning.
func Sniff(c net.Conn, timeout time.Duration) (*Conn, Result, error) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	sc := &Conn{Conn: c, sock: rawsock.Wrap(c)}
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return sc, Result{}, fmt.Errorf("sniff: set deadline: %w", err)
	}
	res, err := sniff(sc)
	if derr := c.SetReadDeadline(time.Time{}); derr != nil && err == nil {
		err = fmt.Errorf("sniff: clear deadline: %w", derr)
	}
	return sc, res, err
}

func sniff(sc *Conn) (Result, error) {
	rec := &recorder{conn: sc.Conn, buf: make([]byte, 0, firstReadSize), limit: recordHeaderLen + MaxHelloSize}
	defer func() { sc.buf = rec.buf }()

	// Three bytes tell a TLS record header (type 22, major version 3) from
	// anything else; decide as soon as a byte rules TLS out.
	for len(rec.buf) < 3 && !notTLS(rec.buf) {
		if err := rec.readMore(); err != nil {
			switch {
			case len(rec.buf) == 0 && (isTimeout(err) || errors.Is(err, io.EOF)):
				// Silent until the timeout (server speaks first) or closed
				// without a word: plaintext, and the app sees what follows.
				return Result{Kind: Plaintext}, nil
			case notTLS(rec.buf):
				return Result{Kind: Plaintext}, nil
			case isTimeout(err):
				return Result{}, ErrTimeout
			case errors.Is(err, io.EOF):
				return Result{}, fmt.Errorf("%w: peer closed after %d bytes", ErrBadHello, len(rec.buf))
			}
			return Result{}, fmt.Errorf("sniff: read: %w", err)
		}
	}
	if notTLS(rec.buf) {
		return Result{Kind: Plaintext}, nil
	}
	if len(rec.buf) >= recordHeaderLen {
		if n := int(rec.buf[3])<<8 | int(rec.buf[4]); n > MaxHelloSize {
			return Result{}, ErrHelloTooLarge
		}
	}

	var hello *tls.ClientHelloInfo
	srv := tls.Server(rec, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			hello = h
			return nil, errSniffed
		},
	})
	herr := srv.Handshake()
	if hello != nil {
		res := Result{Kind: TLS, SNI: hello.ServerName, ALPN: append([]string(nil), hello.SupportedProtos...)}
		for _, p := range res.ALPN {
			if IsMeshALPN(p) {
				res.Kind = MeshTLS
				break
			}
		}
		return res, nil
	}
	switch {
	case errors.Is(rec.err, errTooLarge):
		return Result{}, ErrHelloTooLarge
	case rec.err != nil && isTimeout(rec.err):
		return Result{}, ErrTimeout
	case rec.err != nil && !errors.Is(rec.err, io.EOF):
		return Result{}, fmt.Errorf("sniff: read: %w", rec.err)
	}
	return Result{}, fmt.Errorf("%w: %v", ErrBadHello, herr)
}

var errTooLarge = errors.New("record limit reached")

// recorder is the read-only conn handed to the throwaway tls.Server: it
// replays what was already read, records every new byte, refuses to read
// past limit and swallows writes (alerts) so nothing reaches the peer.
type recorder struct {
	conn  net.Conn
	buf   []byte
	pos   int // next byte of buf to hand to crypto/tls
	limit int
	err   error // first error from conn
}

func (r *recorder) readMore() error {
	if r.err != nil {
		return r.err
	}
	if len(r.buf) >= r.limit {
		r.err = errTooLarge
		return r.err
	}
	if len(r.buf) == cap(r.buf) {
		nb := make([]byte, len(r.buf), min(2*cap(r.buf), r.limit))
		copy(nb, r.buf)
		r.buf = nb
	}
	end := min(cap(r.buf), r.limit)
	n, err := r.conn.Read(r.buf[len(r.buf):end])
	r.buf = r.buf[:len(r.buf)+n]
	if err != nil && n == 0 {
		r.err = err
		return err
	}
	return nil
}

func (r *recorder) Read(p []byte) (int, error) {
	if r.pos == len(r.buf) {
		if err := r.readMore(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.buf[r.pos:])
	r.pos += n
	return n, nil
}

func (r *recorder) Write(p []byte) (int, error) { return 0, errors.New("sniff: read-only") }
func (r *recorder) Close() error                { return nil }
func (r *recorder) LocalAddr() net.Addr         { return r.conn.LocalAddr() }
func (r *recorder) RemoteAddr() net.Addr        { return r.conn.RemoteAddr() }

func (r *recorder) SetDeadline(time.Time) error      { return nil }
func (r *recorder) SetReadDeadline(time.Time) error  { return nil }
func (r *recorder) SetWriteDeadline(time.Time) error { return nil }

// notTLS reports whether the bytes so far already rule out a TLS record.
func notTLS(b []byte) bool {
	return (len(b) >= 1 && b[0] != recordTypeHandshake) || (len(b) >= 2 && b[1] != 3)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}
