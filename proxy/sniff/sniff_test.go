package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"github.com/meshproxy/meshproxy/internal/rawsock"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// tcpPair returns both ends of a real loopback TCP connection.
func tcpPair(t testing.TB) (client, server net.Conn) {
	c, s := loopback.TCPPair(t)
	return c, s
}

// captureConn records what a TLS client writes and fails its reads, so a
// handshake over it yields exactly one ClientHello.
type captureConn struct {
	net.Conn
	out bytes.Buffer
}

func (c *captureConn) Write(p []byte) (int, error)      { return c.out.Write(p) }
func (c *captureConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// clientHello returns the bytes a crypto/tls client sends first.
func clientHello(t testing.TB, sni string, alpn ...string) []byte {
	t.Helper()
	c := &captureConn{}
	_ = tls.Client(c, &tls.Config{ServerName: sni, NextProtos: alpn, InsecureSkipVerify: true}).Handshake()
	if c.out.Len() == 0 {
		t.Fatal("no client hello captured")
	}
	return c.out.Bytes()
}

func TestSniffClassifiesFirstBytes(t *testing.T) {
	bigALPN := make([]string, 100)
	for i := range bigALPN {
		bigALPN[i] = strings.Repeat(string(rune('a'+i%26)), 200)
	}
	tests := []struct {
		name    string
		send    []byte
		wantErr error
		want    Result
	}{
		{"istio alpn is mesh", clientHello(t, "outbound_.80_._.echo", "istio"),
			nil, Result{Kind: MeshTLS, SNI: "outbound_.80_._.echo", ALPN: []string{"istio"}}},
		{"istio http hint first is mesh", clientHello(t, "", "istio-http/1.1", "istio"),
			nil, Result{Kind: MeshTLS, ALPN: []string{"istio-http/1.1", "istio"}}},
		{"h2 alpn is app tls", clientHello(t, "app.example", "h2", "http/1.1"),
			nil, Result{Kind: TLS, SNI: "app.example", ALPN: []string{"h2", "http/1.1"}}},
		{"no alpn is app tls", clientHello(t, "app.example"),
			nil, Result{Kind: TLS, SNI: "app.example"}},
		{"http request is plaintext", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
			nil, Result{Kind: Plaintext}},
		{"one non-tls byte is plaintext", []byte{'x'}, nil, Result{Kind: Plaintext}},
		{"handshake type with bad version is plaintext", []byte{0x16, 0x7f, 0x00, 0x00}, nil, Result{Kind: Plaintext}},
		{"record over 16 KiB is refused", []byte{0x16, 0x03, 0x01, 0x40, 0x01}, ErrHelloTooLarge, Result{}},
		{"hello spanning two records is refused", clientHello(t, "", bigALPN...), ErrHelloTooLarge, Result{}},
		{"garbage in a handshake record is refused", append([]byte{0x16, 0x03, 0x01, 0x00, 0x08}, make([]byte, 8)...), ErrBadHello, Result{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := tcpPair(t)
			go func() { _, _ = client.Write(tt.send) }()
			sc, got, err := Sniff(server, 10*time.Second)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Sniff error = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Sniff: %v", err)
			}
			if got.Kind != tt.want.Kind || got.SNI != tt.want.SNI || strings.Join(got.ALPN, ",") != strings.Join(tt.want.ALPN, ",") {
				t.Fatalf("Sniff = %+v, want %+v", got, tt.want)
			}
			// Nothing read is lost: the replay conn yields exactly what was sent.
			client.Close()
			all, err := io.ReadAll(sc)
			if err != nil {
				t.Fatalf("read replay: %v", err)
			}
			if !bytes.Equal(all, tt.send) {
				t.Fatalf("replayed %d bytes, want the %d sent", len(all), len(tt.send))
			}
		})
	}
}

func TestSniffSilentClientIsPlaintextAfterTimeout(t *testing.T) {
	client, server := tcpPair(t)
	sc, res, err := Sniff(server, 100*time.Millisecond)
	if err != nil || res.Kind != Plaintext {
		t.Fatalf("Sniff = %v, %v; want plaintext", res, err)
	}
	// The deadline is cleared: the server can speak first and later reads work.
	if _, err := sc.Write([]byte("220 ready\r\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 11)
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "220 ready\r\n" {
		t.Fatalf("client read %q, %v", buf, err)
	}
	go func() { _, _ = client.Write([]byte("HELO")) }()
	got := make([]byte, 4)
	if _, err := io.ReadFull(sc, got); err != nil || string(got) != "HELO" {
		t.Fatalf("read after sniff = %q, %v", got, err)
	}
}

func TestSniffHalfSentHelloTimesOut(t *testing.T) {
	hello := clientHello(t, "", "istio")
	for _, n := range []int{1, 4, 40} {
		client, server := tcpPair(t)
		if _, err := client.Write(hello[:n]); err != nil {
			t.Fatal(err)
		}
		_, _, err := Sniff(server, 200*time.Millisecond)
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("%d of %d bytes: Sniff error = %v, want ErrTimeout", n, len(hello), err)
		}
	}
}

func TestSniffPeerClosingMidHelloIsBadHello(t *testing.T) {
	hello := clientHello(t, "", "istio")
	client, server := tcpPair(t)
	if _, err := client.Write(hello[:20]); err != nil {
		t.Fatal(err)
	}
	client.Close()
	if _, _, err := Sniff(server, 10*time.Second); !errors.Is(err, ErrBadHello) {
		t.Fatalf("Sniff error = %v, want ErrBadHello", err)
	}
}

func TestSniffedMeshHelloCompletesARealHandshake(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	svid := ca.Issue(t, "spiffe://cluster.local/ns/a/sa/b", time.Hour)
	cert := testpki.TLSCertificate(svid)
	client, server := tcpPair(t)
	errc := make(chan error, 1)
	go func() {
		tc := tls.Client(client, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio"}})
		if err := tc.Handshake(); err != nil {
			errc <- err
			return
		}
		_, err := tc.Write([]byte("ping"))
		errc <- err
	}()
	sc, res, err := Sniff(server, 10*time.Second)
	if err != nil || res.Kind != MeshTLS {
		t.Fatalf("Sniff = %v, %v", res, err)
	}
	ts := tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"istio"}})
	buf := make([]byte, 4)
	if _, err := io.ReadFull(ts, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read through terminated TLS = %q, %v", buf, err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("client: %v", err)
	}
	if ts.ConnectionState().NegotiatedProtocol != "istio" {
		t.Fatalf("negotiated %q", ts.ConnectionState().NegotiatedProtocol)
	}
}

func TestKindString(t *testing.T) {
	for k, want := range map[Kind]string{Plaintext: "plaintext", TLS: "tls", MeshTLS: "mtls"} {
		if k.String() != want {
			t.Errorf("%d.String() = %q, want %q", int(k), k.String(), want)
		}
	}
}

// memConn is an in-memory conn for the benchmark: it serves one buffer.
type memConn struct {
	net.Conn
	r bytes.Reader
}

func (c *memConn) Read(p []byte) (int, error)      { return c.r.Read(p) }
func (c *memConn) SetReadDeadline(time.Time) error { return nil }

func BenchmarkSniff(b *testing.B) {
	for _, bc := range []struct {
		name string
		data []byte
	}{
		{"mesh", clientHello(b, "outbound_.80_._.echo.default.svc.cluster.local", "istio")},
		{"apptls", clientHello(b, "app.example", "h2", "http/1.1")},
		{"plaintext", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.data)))
			c := &memConn{}
			for b.Loop() {
				c.r.Reset(bc.data)
				if _, _, err := Sniff(c, time.Second); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestReadNowReplaysThenNeverWaits: ReadNow returns the sniffed bytes
// first, then what the socket holds, and rawsock.ErrWouldBlock at once when
// it holds nothing.
func TestReadNowReplaysThenNeverWaits(t *testing.T) {
	client, server := tcpPair(t)
	if _, err := client.Write([]byte("GET / HTTP/1.1\r\n")); err != nil {
		t.Fatal(err)
	}
	sc, res, err := Sniff(server, time.Second)
	if err != nil || res.Kind != Plaintext || sc.Buffered() == 0 {
		t.Fatalf("Sniff = %v, %v with %d bytes to replay; want plaintext, bytes to replay", res, err, sc.Buffered())
	}
	var got []byte
	buf := make([]byte, 64)
	for sc.Buffered() > 0 {
		n, err := sc.ReadNow(buf)
		if err != nil {
			t.Fatalf("ReadNow of replayed bytes: %v", err)
		}
		got = append(got, buf[:n]...)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < len("GET / HTTP/1.1\r\n") { // the rest, if Sniff left any in the socket
		n, err := sc.ReadNow(buf)
		if err != nil && !errors.Is(err, rawsock.ErrWouldBlock) || time.Now().After(deadline) {
			t.Fatalf("ReadNow after %q: %v", got, err)
		}
		got = append(got, buf[:n]...)
	}
	if string(got) != "GET / HTTP/1.1\r\n" {
		t.Fatalf("ReadNow read %q", got)
	}
	start := time.Now()
	if n, err := sc.ReadNow(buf); n != 0 || !errors.Is(err, rawsock.ErrWouldBlock) {
		t.Fatalf("ReadNow with nothing to read = %d, %v; want 0, rawsock.ErrWouldBlock", n, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("ReadNow with nothing to read took %v", d)
	}
}
