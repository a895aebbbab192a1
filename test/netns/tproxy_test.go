package netns_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// TestTProxyInboundAppSeesTheRealClient runs pod A (sidecar, REDIRECT
// capture) against pod B (sidecar with --tproxy behind `redirect install
// --tproxy`), for nftables and iptables: a plain client in A reaches B's app
// through both sidecars over IPv4 and IPv6, the bytes between the pods are
// TLS, B's app sees A's pod address as its peer (not B's own), B's peers
// show A's SPIFFE ID, a pod without a sidecar is refused under STRICT and,
// under PERMISSIVE, reaches the app with its own address too, and
// uninstall leaves no rule, mark or route behind.
func TestTProxyInboundAppSeesTheRealClient(t *testing.T) {
	netns.RequireRoot(t)
	for _, mode := range []redirect.Mode{redirect.ModeNftables, redirect.ModeIptables} {
		t.Run(string(mode), func(t *testing.T) { testTProxyInbound(t, mode) })
	}
}

// tproxySidecar is who B's sidecar runs as: uid 1337 with CAP_NET_ADMIN
// (IP_TRANSPARENT, SO_MARK) as an ambient capability, as a Kubernetes
// sidecar with capabilities.add: [NET_ADMIN].
var tproxySidecar = netns.As{UID: proxyUser.UID, GID: proxyUser.GID, Caps: []int{unix.CAP_NET_ADMIN}}

func testTProxyInbound(t *testing.T, mode redirect.Mode) {
	a, b := netns.NewPair(t)
	ca := testpki.New(t, "cluster.local")
	idA, idB := identityFiles(t, ca, clientID), identityFiles(t, ca, serverID)
	b.Serve(t, netns.Server{Name: "b", Echo: true, ShowPeer: true, Addrs: []string{fmt.Sprintf(":%d", appPort)}})

	flagsA := []string{"--mode", string(mode)}
	flagsB := []string{"--mode", string(mode), "--tproxy"}
	for _, p := range []struct {
		pod   *netns.Pod
		flags []string
	}{{a, flagsA}, {b, flagsB}} {
		if out, err := meshproxy(t, p.pod, append([]string{"redirect", "install"}, p.flags...)...); err != nil {
			t.Fatalf("redirect install in %s: %v\n%s", p.pod.Name, err, out)
		}
		t.Cleanup(func() { _, _ = meshproxy(t, p.pod, append([]string{"redirect", "uninstall"}, p.flags...)...) })
	}
	out, err := meshproxy(t, b, append([]string{"redirect", "status"}, flagsB...)...)
	if err != nil || !strings.Contains(out, "mode "+string(mode)+": installed") || strings.Contains(out, "missing") {
		t.Fatalf("redirect status --tproxy in B: %v\n%s", err, out)
	}
	for _, want := range []string{"TPROXY", "app's replies", "fwmark 0x539"} {
		if !strings.Contains(out, want) {
			t.Errorf("redirect status --tproxy does not mention %q:\n%s", want, out)
		}
	}
	t.Logf("redirect status in pod B:\n%s", out)

	startSidecar(t, a, "", "STRICT", idA)
	sideB := startSidecarAs(t, b, tproxySidecar, "STRICT", idB, "--tproxy")

	app := netns.As{UID: 1000, GID: 1000}
	// A's proxy user skips A's capture: this is traffic from a pod without a sidecar.
	noSidecar := proxyUser

	pairs := []struct{ dst, client netip.Addr }{{netns.BV4, netns.AV4}, {netns.BV6, netns.AV6}}
	for _, c := range pairs {
		t.Run("mtls-"+c.dst.String(), func(t *testing.T) {
			marker := "PLAINTEXT-MARKER-" + strings.ReplaceAll(c.dst.String(), ":", "-")
			sniff := b.Sniff(t)
			line, release := a.DialHold(t, hp(c.dst, appPort), app, netns.DialOpts{Send: marker})
			assertAppPeer(t, line, "app b local="+hp(c.dst, appPort)+" echo="+marker, c.client)
			peers, err := meshproxy(t, b, "peers", "--admin", "127.0.0.1:15000", "-o", "json")
			if err != nil || !strings.Contains(peers, clientID) {
				t.Errorf("B's peers do not show A's identity %s (err %v):\n%s", clientID, err, peers)
			}
			release()
			assertTLSOnWire(t, sniff.Stop(), appPort, marker)
		})
	}

	t.Run("strict-refuses-pod-without-sidecar", func(t *testing.T) {
		for _, c := range pairs {
			line, err := a.Dial(t, hp(c.dst, appPort), noSidecar, netns.DialOpts{Send: "hello"})
			if err == nil && strings.HasPrefix(line, "app") {
				t.Errorf("STRICT served plaintext from a pod without sidecar: %q", line)
			}
		}
	})

	// Same pods, B's sidecar now PERMISSIVE: plaintext is passed through,
	// from the client's address as well.
	sideB.stop(t)
	startSidecarAs(t, b, tproxySidecar, "PERMISSIVE", idB, "--tproxy")
	t.Run("permissive-plaintext", func(t *testing.T) {
		for _, c := range pairs {
			line, err := a.Dial(t, hp(c.dst, appPort), noSidecar, netns.DialOpts{Send: "plain"})
			if err != nil {
				t.Errorf("PERMISSIVE plaintext to %s: %v", hp(c.dst, appPort), err)
				continue
			}
			assertAppPeer(t, line, "app b local="+hp(c.dst, appPort)+" echo=plain", c.client)
		}
	})

	for _, p := range []struct {
		pod   *netns.Pod
		flags []string
		cfg   redirect.Config
	}{{a, flagsA, redirect.Config{Mode: mode}}, {b, flagsB, redirect.Config{Mode: mode, TProxy: true}}} {
		if out, err := meshproxy(t, p.pod, append([]string{"redirect", "uninstall"}, p.flags...)...); err != nil {
			t.Fatalf("redirect uninstall in %s: %v\n%s", p.pod.Name, err, out)
		}
		netns.AssertNoCapture(t, p.pod, p.cfg)
	}
}

// assertAppPeer checks the app's answer "<prefix> peer=ADDR" and that ADDR
// is client's: the app saw the real client, not the proxy.
func assertAppPeer(t *testing.T, line, prefix string, client netip.Addr) {
	t.Helper()
	rest, ok := strings.CutPrefix(line, prefix+" peer=")
	if !ok {
		t.Errorf("app answered %q, want %q followed by its peer", line, prefix)
		return
	}
	peer, err := netip.ParseAddrPort(rest)
	if err != nil {
		t.Errorf("app's peer %q: %v", rest, err)
		return
	}
	if peer.Addr().Unmap() != client {
		t.Errorf("the app saw %s as its peer, want the client's address %s", peer, client)
	}
}

// TestRunTProxyNeedsNetAdmin: without CAP_NET_ADMIN, `run --tproxy` fails
// at start (status 1) naming the capability; --tproxy without --inbound is
// a usage error (status 2) naming the flag.
func TestRunTProxyNeedsNetAdmin(t *testing.T) {
	_, b := netns.NewPair(t)
	ca := testpki.New(t, "cluster.local")
	args := append([]string{"run"}, identityFiles(t, ca, serverID)...)
	args = append(args, "--tproxy", "--inbound", ":15006", "--admin", "off", "--metrics", "off", "--health", "off")
	out, err := b.Command(t, proxyUser, bin, args...).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("run --tproxy without CAP_NET_ADMIN: %v, want status 1\n%s", err, out)
	}
	if !strings.Contains(string(out), "CAP_NET_ADMIN") {
		t.Errorf("run --tproxy without CAP_NET_ADMIN does not name the capability:\n%s", out)
	}

	out, err = exec.Command(bin, "run", "--tproxy", "--outbound", ":15001").CombinedOutput()
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "--tproxy") {
		t.Errorf("run --tproxy without --inbound: %v, want status 2 naming --tproxy\n%s", err, out)
	}
}
