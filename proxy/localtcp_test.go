package proxy

import (
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// socketCongestion maps "local remote" address pairs of established TCP
// sockets to their congestion control, as ss(8) reports them.
func socketCongestion(t *testing.T) map[string]string {
	t.Helper()
	out, err := exec.Command("ss", "-tinH", "state", "established").Output()
	if err != nil {
		t.Skipf("ss (iproute2) cannot list sockets here: %v", err)
	}
	socks := map[string]string{}
	var addrs string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
		case !strings.HasPrefix(line, "\t") && len(f) >= 4:
			addrs = f[2] + " " + f[3]
		case strings.HasPrefix(line, "\t") && addrs != "":
			socks[addrs] = f[0]
			addrs = ""
		}
	}
	return socks
}

// withBBR stands in for a host whose default congestion control is BBR.
func withBBR(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, "bbr")
	}); err != nil {
		return err
	}
	return serr
}

// TestAppSocketsDoNotPace: on a host whose congestion control is BBR, the
// sockets between a sidecar and the apps of its workload — accepted from
// the app by an outbound listener, dialed to the app by the inbound side —
// use Reno, which does not pace (internal/localtcp); the mesh connection
// between the sidecars keeps the host's BBR.
func TestAppSocketsDoNotPace(t *testing.T) {
	lc := net.ListenConfig{Control: withBBR}
	probe, err := lc.Listen(t.Context(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("no BBR congestion control on this kernel: %v", err)
	}
	probe.Close()

	m := newMesh(t)
	a := startApp(t, echo)
	bbrDialer := WithDialer(&net.Dialer{Control: withBBR})
	bbrListen := WithListenConfig(net.ListenConfig{Control: withBBR})
	sst, _ := policyStore(t, peerAuth("STRICT"))
	server := startProxy(t, m.identity(t, echoID), sst, WithInboundExplicit("127.0.0.1:0", a.addr()), bbrDialer, bbrListen)
	cst, _ := policyStore(t, "")
	client := startProxy(t, m.identity(t, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(t, echoID)), bbrDialer, bbrListen)

	c := dial(t, client.Addrs()[0].String())
	defer c.Close()
	if err := roundTrip(c, "hello"); err != nil {
		t.Fatal(err)
	}
	socks := socketCongestion(t)
	// The client sidecar's end of the app's connection: local is its listener.
	fromApp := client.Addrs()[0].String() + " " + c.LocalAddr().String()
	var toApp, meshOut, meshIn []string
	for addrs, cc := range socks {
		local, remote, _ := strings.Cut(addrs, " ")
		switch {
		case remote == a.addr(): // the server sidecar's connection to the app
			toApp = append(toApp, cc)
		case remote == server.Addrs()[0].String(): // the client sidecar's mesh connection
			meshOut = append(meshOut, cc)
		case local == server.Addrs()[0].String(): // the server sidecar's end of it
			meshIn = append(meshIn, cc)
		}
	}
	if got := socks[fromApp]; got != "reno" {
		t.Errorf("the client sidecar's socket from the app (%s): congestion control %q, want reno", fromApp, got)
	}
	if !all(toApp, "reno") {
		t.Errorf("the server sidecar's sockets to the app: congestion control %v, want reno", toApp)
	}
	for what, ccs := range map[string][]string{"client to server": meshOut, "server from client": meshIn} {
		if !all(ccs, "bbr") {
			t.Errorf("mesh sockets %s: congestion control %v, want the host's bbr kept", what, ccs)
		}
	}
}

// all reports whether ccs is not empty and every one is want.
func all(ccs []string, want string) bool {
	for _, cc := range ccs {
		if cc != want {
			return false
		}
	}
	return len(ccs) > 0
}
