package redirect_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/internal/loopback"
	"github.com/meshproxy/meshproxy/redirect"
)

// TestOriginalDstOfAnUncapturedConnection: a connection made straight to
// the proxy has no original destination; OriginalDst must not hand back the
// proxy's own address (the proxy would connect to itself).
func TestOriginalDstOfAnUncapturedConnection(t *testing.T) {
	_, s := loopback.TCPPair(t)
	if dst, err := redirect.OriginalDst(s); !errors.Is(err, redirect.ErrNotRedirected) {
		t.Fatalf("OriginalDst = %v, %v; want ErrNotRedirected", dst, err)
	}
}

func TestOriginalDstNeedsASocket(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := redirect.OriginalDst(a); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("OriginalDst(pipe) = %v, want a 'not a socket' error", err)
	}
}

func TestListenTransparentRefusesNonTCP(t *testing.T) {
	if _, err := redirect.ListenTransparent(context.Background(), "udp", "127.0.0.1:0"); err == nil {
		t.Fatal("ListenTransparent(udp) succeeded")
	}
}
