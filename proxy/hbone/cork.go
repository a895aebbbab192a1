package hbone

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"

	"github.com/meshproxy/meshproxy/internal/rawsock"
)

// CorkConn wraps the socket under a TLS connection so that everything one
// write of the TLS connection produces — crypto/tls writes each record to
// the socket on its own — reaches the socket in one write: Cork before,
// Uncork after. Uncorked, writes pass straight through. Safe for
// concurrent use; writes made while corked (an alert from the read side)
// keep their order.
//
// Reads read ahead while data streams in: crypto/tls reads about one
// record (16 KiB) per read, so once a read fills what crypto/tls asked
// for (more is waiting), reads go through a pooled readAhead buffer, up
// to four records per syscall, until one comes back short; then the
// buffer goes back to the pool once drained, so an idle connection holds
// none. Read is not safe for concurrent use (crypto/tls serialises its
// reads). A plain socket is read and written with internal/rawsock.
type CorkConn struct {
	net.Conn
	sock io.ReadWriter // reads and writes of the socket (rawsock's, for a plain one)

	mu     sync.Mutex
	corked bool
	buf    []byte

	rbuf  *[]byte // the read-ahead buffer, while reads come back full
	rdata []byte  // what of rbuf is not read yet
	rerr  error   // the error that came with rdata, returned after it
	hot   bool    // the last read filled its buffer: more is probably waiting

	// nowait: reads do not wait for the socket (ReadNow of the TLS
	// connection above): rawsock.ErrWouldBlock when it holds nothing.
	nowait bool

	// pending and flush, if set: before a read would wait for the socket
	// while pending reports work, flush does it (an HBONE reader's
	// deferred flushes, see flushBatch). Set before reads start.
	pending func() bool
	flush   func()
}

// beforeWait sets what runs before a read waits for the socket.
func (c *CorkConn) beforeWait(pending func() bool, flush func()) {
	c.pending, c.flush = pending, flush
}

// readAhead is the size of a CorkConn's read-ahead buffer.
const readAhead = 64 << 10

var readBuffers = sync.Pool{New: func() any {
	b := make([]byte, readAhead)
	return &b
}}

// Read reads from the socket, reading ahead while data streams in.
func (c *CorkConn) Read(p []byte) (int, error) {
	if len(c.rdata) > 0 || c.rerr != nil {
		n := copy(p, c.rdata)
		c.rdata = c.rdata[n:]
		if len(c.rdata) > 0 {
			return n, nil
		}
		err := c.rerr
		c.rerr = nil
		if !c.hot {
			c.releaseRead()
		}
		return n, err
	}
	if c.nowait {
		return rawsock.ReadNow(c.sock, p)
	}
	if c.pending != nil && c.pending() {
		if n, err := rawsock.ReadNow(c.sock, p); !errors.Is(err, rawsock.ErrWouldBlock) {
			return n, err
		}
		c.flush()
	}
	if !c.hot || len(p) >= readAhead {
		n, err := c.sock.Read(p)
		c.hot = err == nil && n == len(p) && len(p) < readAhead
		if !c.hot {
			c.releaseRead()
		}
		return n, err
	}
	if c.rbuf == nil {
		c.rbuf = readBuffers.Get().(*[]byte)
	}
	buf := *c.rbuf
	n, err := c.sock.Read(buf)
	c.hot = err == nil && n == len(buf)
	m := copy(p, buf[:n])
	c.rdata = buf[m:n]
	if len(c.rdata) > 0 {
		c.rerr = err
		return m, nil
	}
	if !c.hot {
		c.releaseRead()
	}
	return m, err
}

func (c *CorkConn) releaseRead() {
	if c.rbuf != nil {
		readBuffers.Put(c.rbuf)
		c.rbuf, c.rdata = nil, nil
	}
}

// ReadNow reads from tc, the TLS connection on c, only what needs no wait
// for the socket: a record's data already decrypted, records already read,
// and what the socket holds now. It returns 0 and a nil error when a
// record is not complete without waiting (its start stays with crypto/tls
// for the next Read). Like Read, not safe for concurrent use.
func (c *CorkConn) ReadNow(tc *tls.Conn, p []byte) (int, error) {
	c.nowait = true
	n, err := tc.Read(p)
	c.nowait = false
	if errors.Is(err, rawsock.ErrWouldBlock) {
		err = nil
	}
	return n, err
}

// NewCorkConn wraps c.
func NewCorkConn(c net.Conn) *CorkConn { return &CorkConn{Conn: c, sock: rawsock.Wrap(c)} }

// Write sends p, or holds it until Uncork while corked.
func (c *CorkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.corked {
		if c.buf == nil {
			c.buf = getBuffer()
		}
		c.buf = append(c.buf, p...)
		c.mu.Unlock()
		return len(p), nil
	}
	c.mu.Unlock()
	return c.sock.Write(p)
}

// Cork holds writes until Uncork.
func (c *CorkConn) Cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// Uncork writes what was held, in one write, and lets writes through again.
func (c *CorkConn) Uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if len(c.buf) == 0 {
		putBuffer(c.buf)
		c.buf = nil
		return nil
	}
	_, err := c.sock.Write(c.buf)
	putBuffer(c.buf)
	c.buf = nil
	return err
}

// Gather runs write, which writes n bytes of plaintext on the TLS
// connection over c, so that the records it makes reach the socket in one
// write when they are several (crypto/tls writes each record on its own;
// one record is one write anyway).
func (c *CorkConn) Gather(n int, write func() error) error {
	if n <= maxRecord {
		return write()
	}
	c.Cork()
	err := write()
	if uerr := c.Uncork(); err == nil {
		err = uerr
	}
	return err
}

// CloseWrite half-closes the wrapped socket, if it can.
func (c *CorkConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
