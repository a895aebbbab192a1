package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"

	"github.com/meshproxy/meshproxy/proxy/proxytest"
)

// tlsPair is a TLS 1.3 connection over loopback TCP, both ends handshaken.
func tlsPair(b testing.TB) (*tls.Conn, *tls.Conn) {
	b.Helper()
	c, s, _, _ := corkedTLSPair(b)
	return c, s
}

// corkedTLSPair is tlsPair with a CorkConn under each end and full-size
// records from the first byte, as the proxy's mesh connections are.
func corkedTLSPair(b testing.TB) (client, server *tls.Conn, ccork, scork *CorkConn) {
	b.Helper()
	cs, ss := tcpPair(b)
	return corkedTLSPairOver(b, cs, ss)
}

// corkedTLSPairOver is corkedTLSPair on the given client and server sockets.
func corkedTLSPairOver(b testing.TB, cs, ss net.Conn) (client, server *tls.Conn, ccork, scork *CorkConn) {
	b.Helper()
	ccork, scork = NewCorkConn(cs), NewCorkConn(ss)
	client, server = proxytest.TLSPair(b, ccork, scork)
	return client, server, ccork, scork
}

// BenchmarkBulk moves bytes one way in 32 KiB writes: over a bare TLS
// connection (the per-connection mTLS floor) and as one HBONE stream over
// the same kind of connection. Compare their MB/s.
func BenchmarkBulk(b *testing.B) {
	const chunk = 32 << 10
	run := func(b *testing.B, w io.Writer, r io.Reader) {
		buf := make([]byte, chunk)
		done := make(chan int64, 1)
		go func() {
			n, _ := io.CopyBuffer(io.Discard, r, make([]byte, chunk))
			done <- n
		}()
		b.SetBytes(chunk)
		b.ResetTimer()
		for b.Loop() {
			if _, err := w.Write(buf); err != nil {
				b.Fatal(err)
			}
		}
		if cw, ok := w.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		<-done
	}
	b.Run("tls", func(b *testing.B) {
		c, s := tlsPair(b)
		run(b, c, s)
	})
	b.Run("hbone-stream", func(b *testing.B) {
		c, s, ccork, scork := corkedTLSPair(b)
		accepted := make(chan *Stream, 1)
		server := NewServer(s, Options{Cork: scork})
		go func() {
			_ = server.Serve(func(st *Stream) {
				_ = st.Respond(http.StatusOK)
				accepted <- st
			})
		}()
		client := NewClient(c, Options{Cork: ccork})
		b.Cleanup(func() { client.Close(); server.Close() })
		st, err := client.Open(context.Background(), "10.0.0.1:80")
		if err != nil {
			b.Fatal(err)
		}
		run(b, st, <-accepted)
	})
}

// BenchmarkRequestResponse is 1 KiB ping-pong on kept connections: a bare
// TLS connection, and a stream of a pooled HBONE connection.
func BenchmarkRequestResponse(b *testing.B) {
	const size = 1024
	run := func(b *testing.B, c io.ReadWriter, s io.ReadWriter) {
		go func() {
			buf := make([]byte, size)
			for {
				if _, err := io.ReadFull(s, buf); err != nil {
					return
				}
				if _, err := s.Write(buf); err != nil {
					return
				}
			}
		}()
		buf := make([]byte, size)
		b.ResetTimer()
		for b.Loop() {
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("tls", func(b *testing.B) {
		c, s := tlsPair(b)
		run(b, c, s)
	})
	b.Run("hbone-stream", func(b *testing.B) {
		c, s, ccork, scork := corkedTLSPair(b)
		accepted := make(chan *Stream, 1)
		server := NewServer(s, Options{Cork: scork})
		go func() {
			_ = server.Serve(func(st *Stream) {
				_ = st.Respond(http.StatusOK)
				accepted <- st
			})
		}()
		client := NewClient(c, Options{Cork: ccork})
		b.Cleanup(func() { client.Close(); server.Close() })
		st, err := client.Open(context.Background(), "10.0.0.1:80")
		if err != nil {
			b.Fatal(err)
		}
		run(b, st, <-accepted)
	})
}

var _ net.Conn = (*Stream)(nil)
