package localtcp

import (
	"context"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// available skips the test unless the kernel offers congestion control cc.
func available(t *testing.T, cc string) {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_available_congestion_control")
	if err != nil {
		t.Skipf("cannot tell which congestion control algorithms the kernel has: %v", err)
	}
	for _, have := range strings.Fields(string(b)) {
		if have == cc {
			return
		}
	}
	t.Skipf("the kernel has no %s congestion control (it has %s)", cc, strings.TrimSpace(string(b)))
}

// setCC returns a Control function that gives a socket congestion control
// cc, as a host default would.
func setCC(t *testing.T, cc string) func(string, string, syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, cc)
		}); err != nil {
			return err
		}
		if serr != nil {
			t.Skipf("cannot set congestion control %s here: %v", cc, serr)
		}
		return nil
	}
}

func congestion(t *testing.T, c net.Conn) string {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cc string
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cc, serr = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatal(serr)
	}
	return cc
}

// pair listens with lc, dials with d and returns both ends.
func pair(t *testing.T, lc net.ListenConfig, d net.Dialer) (accepted, dialed net.Conn) {
	t.Helper()
	ctx := context.Background()
	ln, err := lc.Listen(ctx, "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dialed, err = d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dialed.Close() })
	accepted, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { accepted.Close() })
	return accepted, dialed
}

// TestPacingSocketsGetReno: on a host whose default is BBR (set here per
// socket, as the host default would), a listener tuned by Chain hands out
// connections with Reno, and so does a dialer; the untuned end keeps BBR.
func TestPacingSocketsGetReno(t *testing.T) {
	available(t, "bbr")
	bbr := setCC(t, "bbr")
	accepted, dialed := pair(t, net.ListenConfig{Control: Chain(bbr)}, net.Dialer{Control: bbr})
	if got := congestion(t, accepted); got != Unpaced {
		t.Errorf("accepted from a tuned listener: congestion control %q, want %q", got, Unpaced)
	}
	if got := congestion(t, dialed); got != "bbr" {
		t.Errorf("untuned dialer: congestion control %q, want bbr (the test's stand-in for the host default)", got)
	}

	accepted, dialed = pair(t, net.ListenConfig{Control: bbr}, net.Dialer{Control: Chain(bbr)})
	if got := congestion(t, dialed); got != Unpaced {
		t.Errorf("tuned dialer: congestion control %q, want %q", got, Unpaced)
	}
	if got := congestion(t, accepted); got != "bbr" {
		t.Errorf("untuned listener: congestion control %q, want bbr", got)
	}
}

// TestOtherAlgorithmsAreKept: an algorithm that does not pace is the
// operator's choice and stays.
func TestOtherAlgorithmsAreKept(t *testing.T) {
	available(t, "cubic")
	cubic := setCC(t, "cubic")
	accepted, dialed := pair(t, net.ListenConfig{Control: Chain(cubic)}, net.Dialer{Control: Chain(cubic)})
	for name, c := range map[string]net.Conn{"accepted": accepted, "dialed": dialed} {
		if got := congestion(t, c); got != "cubic" {
			t.Errorf("%s: congestion control %q, want cubic kept", name, got)
		}
	}
}

// TestDefault: with no Control before it, Control leaves the host default
// unless it paces.
func TestDefault(t *testing.T) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Skipf("cannot read the host's default congestion control: %v", err)
	}
	def := strings.TrimSpace(string(b))
	want := def
	if Paces(def) {
		want = Unpaced
	}
	accepted, dialed := pair(t, net.ListenConfig{Control: Control}, net.Dialer{Control: Control})
	for name, c := range map[string]net.Conn{"accepted": accepted, "dialed": dialed} {
		if got := congestion(t, c); got != want {
			t.Errorf("%s: congestion control %q with host default %q, want %q", name, got, def, want)
		}
	}
}

func TestPaces(t *testing.T) {
	for cc, want := range map[string]bool{"bbr": true, "bbr2": true, "bbr3": true, "cubic": false, "reno": false, "dctcp": false, "": false} {
		if got := Paces(cc); got != want {
			t.Errorf("Paces(%q) = %v, want %v", cc, got, want)
		}
	}
}

// TestNotTCP: a socket that is not TCP is left alone and reported as such.
func TestNotTCP(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if got := Tune(fd); got != "" {
		t.Errorf("Tune(UDP socket) = %q, want \"\"", got)
	}
}
