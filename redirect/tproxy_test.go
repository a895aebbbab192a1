package redirect_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
	"golang.org/x/sys/unix"
)

func tproxyCases() []captureCase {
	var out []captureCase
	for _, tc := range captureCases() {
		if tc.cfg.TProxy {
			out = append(out, tc)
		}
	}
	return out
}

// dialAndRead dials with DialTransparent inside pod p and returns the
// app's one-line answer.
func dialAndRead(p *netns.Pod, client netip.AddrPort, dst string, timeout time.Duration) (string, error) {
	var line string
	err := p.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		c, err := redirect.DialTransparent(ctx, client, dst, redirect.DefaultTProxyMark)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(timeout))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

// TestDialTransparentReachesTheAppAsTheClient: behind TPROXY capture, a
// connection from DialTransparent reaches the pod's app with the client's
// address as its peer, over IPv4 and IPv6 (the app's replies, addressed to
// the client, come back to the dialer); without the capture those replies
// leave the pod and the dial fails, so the rules are what makes it work.
func TestDialTransparentReachesTheAppAsTheClient(t *testing.T) {
	for _, tc := range tproxyCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // independent namespaces; mostly waiting out negative dials
			if tc.needs != nil {
				tc.needs(t)
			}
			_, b := netns.NewPair(t)
			b.Serve(t, netns.Server{Name: "b", ShowPeer: true, Addrs: []string{fmt.Sprintf(":%d", app)}})
			cfg := tc.cfg
			install(t, b, cfg)
			t.Cleanup(func() { _ = b.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })

			pairs := []struct{ client, dst netip.Addr }{{netns.AV4, netns.BV4}, {netns.AV6, netns.BV6}}
			for _, c := range pairs {
				client := netip.AddrPortFrom(c.client, 41000)
				to := hostPort(c.dst, app)
				line, err := dialAndRead(b, client, to, 30*time.Second)
				if err != nil {
					t.Errorf("DialTransparent from %s to %s: %v", client, to, err)
					continue
				}
				prefix := "app b local=" + to + " peer="
				peer, perr := netip.ParseAddrPort(strings.TrimPrefix(line, prefix))
				if !strings.HasPrefix(line, prefix) || perr != nil || peer.Addr() != c.client {
					t.Errorf("the app answered %q; want its peer to be the client's address %s", line, c.client)
				}
				if peer.Port() == client.Port() {
					t.Errorf("source port %d is the client's own port", peer.Port())
				}
			}

			if err := b.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }); err != nil {
				t.Fatal(err)
			}
			// A short wait is enough here: only failure is expected.
			for _, c := range pairs {
				to := hostPort(c.dst, app)
				if line, err := dialAndRead(b, netip.AddrPortFrom(c.client, 41000), to, 2*time.Second); err == nil {
					t.Errorf("without the capture, DialTransparent to %s still got an answer: %q", to, line)
				}
			}
		})
	}
}

// TestDialTransparentNeverUsesTheClientPort: a source port equal to the
// client's would collide with the proxy's own accepted connection, so it is
// refused even when it is the only port the kernel can give.
func TestDialTransparentNeverUsesTheClientPort(t *testing.T) {
	_, b := netns.NewPair(t)
	b.Serve(t, netns.Server{Name: "b", ShowPeer: true, Addrs: []string{fmt.Sprintf(":%d", app)}})
	cfg := redirect.Config{Mode: redirect.ModeNftables, TProxy: true}
	install(t, b, cfg)
	t.Cleanup(func() { _ = b.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })
	netns.Run(t, "ip", "netns", "exec", b.Name, "sh", "-c", "echo '40000 40000' > /proc/sys/net/ipv4/ip_local_port_range")

	to := hostPort(netns.BV4, app)
	_, err := dialAndRead(b, netip.AddrPortFrom(netns.AV4, 40000), to, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "client's port") {
		t.Fatalf("DialTransparent with only the client's port free: %v, want a refusal naming the client's port", err)
	}
	line, err := dialAndRead(b, netip.AddrPortFrom(netns.AV4, 40001), to, 30*time.Second)
	if want := "app b local=" + to + " peer=" + hostPort(netns.AV4, 40000); err != nil || line != want {
		t.Fatalf("DialTransparent from another client port: %q, %v; want %q", line, err, want)
	}
}

// TestDialTransparentDoesNotPace: the connection to the app stays in the
// pod, so in a pod whose congestion control is BBR it gets Reno, which
// does not pace (internal/localtcp).
func TestDialTransparentDoesNotPace(t *testing.T) {
	_, b := netns.NewPair(t)
	b.Serve(t, netns.Server{Name: "b", ShowPeer: true, Addrs: []string{fmt.Sprintf(":%d", app)}})
	if err := exec.Command("ip", "netns", "exec", b.Name, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=bbr").Run(); err != nil {
		t.Skipf("no BBR congestion control on this kernel: %v", err)
	}
	cfg := redirect.Config{Mode: redirect.ModeNftables, TProxy: true}
	install(t, b, cfg)
	t.Cleanup(func() { _ = b.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })
	err := b.Do(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := redirect.DialTransparent(ctx, netip.AddrPortFrom(netns.AV4, 41000), hostPort(netns.BV4, app), redirect.DefaultTProxyMark)
		if err != nil {
			return err
		}
		defer c.Close()
		rc, err := c.(*net.TCPConn).SyscallConn()
		if err != nil {
			return err
		}
		var cc string
		var serr error
		if err := rc.Control(func(fd uintptr) {
			cc, serr = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
		}); err != nil {
			return err
		}
		if serr != nil {
			return serr
		}
		if cc != "reno" {
			return fmt.Errorf("congestion control %q in a pod whose default is bbr, want reno", cc)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestDialTransparentRejectsBadAddresses names what is wrong before any
// socket is made.
func TestDialTransparentRejectsBadAddresses(t *testing.T) {
	for _, tc := range []struct {
		client netip.AddrPort
		dst    string
		want   string
	}{
		{netip.AddrPort{}, "192.0.2.1:80", "no client address"},
		{netip.MustParseAddrPort("0.0.0.0:1"), "192.0.2.1:80", "no client address"},
		{netip.MustParseAddrPort("192.0.2.2:1"), "app:80", "not IP:port"},
		{netip.MustParseAddrPort("192.0.2.2:1"), "[2001:db8::1]:80", "address families differ"},
	} {
		_, err := redirect.DialTransparent(context.Background(), tc.client, tc.dst, redirect.DefaultTProxyMark)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("DialTransparent(%v, %q) = %v, want an error containing %q", tc.client, tc.dst, err, tc.want)
		}
	}
}

// TestTProxyCaptureFailsClosed: with TPROXY capture installed and no proxy
// listening on the inbound port (stopped, crashing), inbound connections
// are dropped instead of reaching the app around the proxy.
func TestTProxyCaptureFailsClosed(t *testing.T) {
	for _, tc := range tproxyCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // independent namespaces; mostly waiting out negative dials
			if tc.needs != nil {
				tc.needs(t)
			}
			a, b := netns.NewPair(t)
			b.Serve(t, netns.Server{Name: "b", Addrs: []string{fmt.Sprintf(":%d", app)}})
			cfg := tc.cfg
			install(t, b, cfg)
			t.Cleanup(func() { _ = b.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })
			for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
				to := hostPort(dst, app)
				err := a.Do(func() error {
					// Only failure is expected, so a short timeout cannot flake.
					c, err := net.DialTimeout("tcp", to, 2*time.Second)
					if err != nil {
						return err
					}
					c.Close()
					return nil
				})
				if err == nil {
					t.Errorf("%s reached the app with no proxy on :%d", to, redirect.DefaultInboundPort)
				}
			}
		})
	}
}
