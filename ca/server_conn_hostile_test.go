package ca

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/keepalive"
)

// withConnLimits shortens the server's connection bounds for a test.
func withConnLimits(p keepalive.ServerParameters) ServerOption {
	return func(o *serverOptions) { o.conn = p }
}

// An attacker who opens connections to the CA and leaves them idle, or
// starts a request and never sends its message, must not hold a file
// descriptor forever: the CA ends such connections.
func TestIdleAndStalledConnectionsAreClosed(t *testing.T) {
	tests := []struct {
		name  string
		stall func(t *testing.T, fr *http2.Framer)
	}{
		{"idle after the preface", func(*testing.T, *http2.Framer) {}},
		{"request headers without the message", func(t *testing.T, fr *http2.Framer) {
			var buf []byte
			enc := hpack.NewEncoder(&bytesWriter{&buf})
			for _, f := range [][2]string{
				{":method", "POST"}, {":scheme", "https"}, {":authority", "localhost"},
				{":path", "/istio.v1.auth.IstioCertificateService/CreateCertificate"},
				{"content-type", "application/grpc"}, {"te", "trailers"},
			} {
				if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
					t.Fatal(err)
				}
			}
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: buf, EndHeaders: true}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	tc := startCA(t, nil, withConnLimits(keepalive.ServerParameters{
		MaxConnectionIdle: 500 * time.Millisecond, MaxConnectionAge: time.Second, MaxConnectionAgeGrace: time.Second,
	}))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := tls.Dial("tcp", tc.addr, &tls.Config{RootCAs: tc.roots, ServerName: "localhost", NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
				t.Fatal(err)
			}
			fr := http2.NewFramer(conn, conn)
			if err := fr.WriteSettings(); err != nil {
				t.Fatal(err)
			}
			tt.stall(t, fr)
			// Far longer than the limits above, far shorter than forever.
			if err := conn.SetReadDeadline(time.Now().Add(45 * time.Second)); err != nil {
				t.Fatal(err)
			}
			for range 10000 {
				f, err := fr.ReadFrame()
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					t.Fatal("the CA kept the connection open")
				case err != nil:
					return // closed by the CA
				}
				if _, ok := f.(*http2.SettingsFrame); ok && !f.Header().Flags.Has(http2.FlagSettingsAck) {
					if err := fr.WriteSettingsAck(); err != nil {
						return
					}
				}
			}
			t.Fatal("too many frames")
		})
	}
}

type bytesWriter struct{ b *[]byte }

func (w *bytesWriter) Write(p []byte) (int, error) {
	*w.b = append(*w.b, p...)
	return len(p), nil
}
