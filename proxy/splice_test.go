package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// readChars is rchar of /proc/self/io: bytes this process passed through
// read(2) and similar. splice(2) moves bytes kernel to kernel and does not
// count there.
func readChars(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Skipf("no /proc/self/io: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar: "); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("parse %q: %v", line, err)
			}
			return n
		}
	}
	t.Skip("no rchar in /proc/self/io")
	return 0
}

// TestPassthroughSplicesInTheKernel: a DISABLE port hands the accepted
// socket and the app's socket to the forwarder as they are, so bulk data
// goes through (*net.TCPConn).ReadFrom (splice) and not through the
// proxy's user-space buffers: this process reads the payload once (the
// app), not twice (app and proxy).
func TestPassthroughSplicesInTheKernel(t *testing.T) {
	m := newMesh(t)
	a := startApp(t, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d\n", n)
	})
	st, _ := policyStore(t, peerAuth("DISABLE"))
	p := startProxy(t, m.identity(t, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))

	payload := make([]byte, 64<<20)
	before := readChars(t)
	c := dial(t, p.Addrs()[0].String())
	defer c.Close()
	if _, err := c.Write(payload); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read the app's count: %v", err)
	}
	if got := strings.TrimSpace(line); got != strconv.Itoa(len(payload)) {
		t.Fatalf("app received %s bytes, want %d", got, len(payload))
	}
	read := readChars(t) - before
	// The app's read of the payload counts once; a user-space copy in the
	// proxy would add as much again.
	if read > int64(len(payload))*3/2 {
		t.Fatalf("process read %d bytes for a %d-byte passthrough: the proxy copied in user space instead of splicing", read, len(payload))
	}
}
