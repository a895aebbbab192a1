package hbone

import (
	"net"
	"sync"
)

// CorkConn wraps the socket under a TLS connection so that everything one
// write of the TLS connection produces — crypto/tls writes each record to
// the socket on its own — reaches the socket in one write: Cork before,
// Uncork after. Uncorked, writes pass straight through. Safe for
// concurrent use; writes made while corked (an alert from the read side)
// keep their order.
type CorkConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool
	buf    []byte
}

// NewCorkConn wraps c.
func NewCorkConn(c net.Conn) *CorkConn { return &CorkConn{Conn: c} }

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
	return c.Conn.Write(p)
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
	_, err := c.Conn.Write(c.buf)
	putBuffer(c.buf)
	c.buf = nil
	return err
}

// CloseWrite half-closes the wrapped socket, if it can.
func (c *CorkConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
