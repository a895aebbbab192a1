package proxy

import (
	"io"
	"net"
	"testing"

	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	fwd "github.com/meshproxy/meshproxy/proxy/forward"
	"github.com/meshproxy/meshproxy/proxy/mesh"
)

// BenchmarkCopyLoop measures the forwarder alone: bytes/s from a client
// socket through forward.Forward into a sink socket, and allocations per MiB.
func BenchmarkCopyLoop(b *testing.B) {
	client, down := tcpPair(b)
	up, sink := tcpPair(b)
	t := conntrack.NewConn(b.Context(), mesh.DirInbound, down)
	t.AddSocket(up)
	done := make(chan error, 1)
	go func() {
		done <- fwd.Forward(down, up, &t.Stats, mesh.DefaultIdleTimeout, t.Abort, metrics.Bytes.WithLabelValues(mesh.DirInbound))
	}()
	drained := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, sink)
		drained <- n
	}()

	chunk := make([]byte, 1<<20)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := client.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	_ = client.(*net.TCPConn).CloseWrite()
	if n := <-drained; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
	}
	b.StopTimer()
	sink.Close()
	<-done
}

// BenchmarkProxyHandshake measures a full connection through an outbound
// and an inbound sidecar: TCP connect, mesh mTLS handshake with SPIFFE
// verification both ways, authorization, one byte each way.
func BenchmarkProxyHandshake(b *testing.B) {
	m := newMesh(b)
	a := startApp(b, echo)
	st, _ := policyStore(b, peerAuth("STRICT"))
	server := startProxy(b, m.identity(b, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	cst, _ := policyStore(b, "")
	client := startProxy(b, m.identity(b, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(b, echoID)))
	entry := client.Addrs()[0].String()
	buf := make([]byte, 1)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", entry)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write([]byte{'x'}); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}
