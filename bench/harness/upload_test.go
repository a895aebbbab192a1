package harness

import (
	"context"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/proxy/proxytest"
)

// TestUploadConfirmsEveryByte: an upload through a faithful relay is
// confirmed byte for byte; one that loses the tail of the upload, or
// changes a byte while the app checks, fails the run instead of counting.
func TestUploadConfirmsEveryByte(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	echoDone := make(chan error, 1)
	go func() { echoDone <- ServeEcho(ctx, app) }()
	defer func() {
		cancel()
		if err := <-echoDone; err != nil {
			t.Errorf("echo app: %v", err)
		}
	}()

	faithful := func(dst io.Writer, src io.Reader) { _, _ = io.Copy(dst, src) }
	// loseTail passes on only what fits below 1 MiB, then drops the rest.
	loseTail := func(dst io.Writer, src io.Reader) {
		_, _ = io.CopyN(dst, src, 1<<20)
		_, _ = io.Copy(io.Discard, src)
	}
	// flipByte changes one byte 100 KiB into the upload.
	flipByte := func(dst io.Writer, src io.Reader) {
		buf := make([]byte, 100<<10)
		if _, err := io.ReadFull(src, buf); err != nil {
			return
		}
		buf[len(buf)-1] ^= 0x40
		if _, err := dst.Write(buf); err == nil {
			_, _ = io.Copy(dst, src)
		}
	}
	for _, tc := range []struct {
		name   string
		relay  func(dst io.Writer, src io.Reader)
		verify bool
		fail   bool
		// wantErr is in the failure's message; the app's closing on a
		// changed byte fails the client's next write or its wait for the
		// count, whichever comes first.
		wantErr string
	}{
		{"faithful", faithful, false, false, ""},
		{"faithful, checked", faithful, true, false, ""},
		{"tail lost", loseTail, false, true, "the app received 1048575 of the"}, // 1 MiB less the mode byte
		{"byte changed, checked", flipByte, true, true, "upload"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr := startRelay(ctx, t, app.Addr().String(), tc.relay)
			res := Upload(ctx, addr, 1, 300*time.Millisecond, tc.verify)
			if !tc.fail {
				if res.Errors != 0 || res.Ops != 1 || res.Bytes < 2<<20 {
					t.Fatalf("%d uploads confirmed, %d bytes, %d errors (first: %v); want 1 upload of at least 2 MiB", res.Ops, res.Bytes, res.Errors, res.FirstErr)
				}
				return
			}
			if res.Errors != 1 || res.Ops != 0 || res.FirstErr == nil || !strings.Contains(res.FirstErr.Error(), tc.wantErr) {
				t.Fatalf("%d uploads confirmed, %d errors, first %v; want one failure saying %q", res.Ops, res.Errors, res.FirstErr, tc.wantErr)
			}
		})
	}
}

// startRelay relays connections to app, passing the client's bytes
// through up (which returns at the client's EOF; the relay then
// half-closes toward the app) and the app's back unchanged.
func startRelay(ctx context.Context, t *testing.T, app string, up func(dst io.Writer, src io.Reader)) string {
	t.Helper()
	return proxytest.StartApp(t, time.Minute, func(c net.Conn) {
		var d net.Dialer
		a, err := d.DialContext(ctx, "tcp", app)
		if err != nil {
			return
		}
		defer a.Close()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_, _ = io.Copy(c, a)
			_ = c.(*net.TCPConn).CloseWrite()
		}()
		up(a, c)
		_ = a.(*net.TCPConn).CloseWrite()
		<-done
	}).Addr()
}
