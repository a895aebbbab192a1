package redirect_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

func TestMain(m *testing.M) {
	netns.RunHelper()
	os.Exit(m.Run())
}

// app is the pods' application port; appExcluded is excluded from inbound
// capture.
const (
	app         = 8080
	appExcluded = 9090
)

var (
	appUser = netns.As{UID: 1000, GID: 1000}
	proxyAs = netns.As{UID: redirect.DefaultProxyUID, GID: redirect.DefaultProxyGID}
)

func hostPort(a netip.Addr, port int) string { return netip.AddrPortFrom(a, uint16(port)).String() }

// captureCase is one mechanism under test.
type captureCase struct {
	name string
	cfg  redirect.Config
	// needs skips the case when the kernel truly lacks a feature.
	needs func(t *testing.T)
}

func captureCases() []captureCase {
	return []captureCase{
		{name: "nftables", cfg: redirect.Config{Mode: redirect.ModeNftables}},
		{name: "nftables-tproxy", cfg: redirect.Config{Mode: redirect.ModeNftables, TProxy: true}},
		{name: "iptables-nft", cfg: redirect.Config{Mode: redirect.ModeIptables, IptablesBackend: redirect.BackendNft},
			needs: needTool("iptables-nft-restore", "ip6tables-nft-restore")},
		{name: "iptables-legacy", cfg: redirect.Config{Mode: redirect.ModeIptables, IptablesBackend: redirect.BackendLegacy},
			needs: needTool("iptables-legacy-restore", "ip6tables-legacy-restore")},
		{name: "iptables-nft-tproxy", cfg: redirect.Config{Mode: redirect.ModeIptables, IptablesBackend: redirect.BackendNft, TProxy: true},
			needs: needTool("iptables-nft-restore", "ip6tables-nft-restore")},
		{name: "iptables-legacy-tproxy", cfg: redirect.Config{Mode: redirect.ModeIptables, IptablesBackend: redirect.BackendLegacy, TProxy: true},
			needs: needTool("iptables-legacy-restore", "ip6tables-legacy-restore")},
		{name: "ebpf", cfg: redirect.Config{Mode: redirect.ModeEBPF}, needs: needEBPF},
	}
}

func needTool(names ...string) func(t *testing.T) {
	return func(t *testing.T) {
		for _, n := range names {
			if _, err := exec.LookPath(n); err != nil {
				t.Fatalf("%s not installed (Debian package iptables): %v", n, err)
			}
		}
	}
}

func needEBPF(t *testing.T) {
	if _, err := netns.Cgroup2Mount(); err != nil {
		t.Skipf("kernel without a cgroup v2 hierarchy: %v", err)
	}
}

// TestCapture runs, for every mechanism, a client in pod A connecting to
// the app in pod B: the stand-in proxies on 15001 (A) and 15006 (B) must see
// the connection and recover its original destination, over IPv4 and IPv6,
// while the proxy's own traffic, loopback, excluded CIDRs and excluded
// ports bypass capture; install twice changes nothing and uninstall leaves
// nothing behind.
func TestCapture(t *testing.T) {
	for _, tc := range captureCases() {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needs != nil {
				tc.needs(t)
			}
			testCapture(t, tc.cfg)
		})
	}
}

func testCapture(t *testing.T, base redirect.Config) {
	ctx := context.Background()
	a, b := netns.NewPair(t)
	var cgroup string
	if base.Mode == redirect.ModeEBPF {
		cgroup = netns.NewCgroup(t)
	}
	pod := netns.As{UID: appUser.UID, GID: appUser.GID, Cgroup: cgroup}
	proxy := netns.As{UID: proxyAs.UID, GID: proxyAs.GID, Cgroup: cgroup}

	// Pod B: the app (also on an excluded port) and B's inbound stand-in.
	b.Serve(t, netns.Server{Name: "b", Addrs: []string{fmt.Sprintf(":%d", app), fmt.Sprintf(":%d", appExcluded)}})
	b.Serve(t, netns.Server{Name: "b-in", Proxy: true, Addrs: []string{":15006"}, Transparent: base.TProxy, As: proxyAs})
	// Pod A: its own app (for loopback) and A's outbound stand-in.
	a.Serve(t, netns.Server{Name: "a", Addrs: []string{fmt.Sprintf(":%d", app)}})
	a.Serve(t, netns.Server{Name: "a-out", Proxy: true, Addrs: []string{":15001"}, As: proxy})

	cfgA := base
	cfgA.CgroupPath = cgroup
	cfgA.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("198.19.0.0/24"), netip.MustParsePrefix("fd00:198:19::/64")}
	cfgB := base
	if base.Mode == redirect.ModeEBPF {
		cfgB.CgroupPath = netns.NewCgroup(t)
	}
	cfgB.ExcludeInboundPorts = []uint16{appExcluded}

	install(t, a, cfgA)
	install(t, b, cfgB)
	t.Cleanup(func() {
		_ = a.Do(func() error { return redirect.Uninstall(ctx, cfgA) })
		_ = b.Do(func() error { return redirect.Uninstall(ctx, cfgB) })
	})

	expect := func(from *netns.Pod, addr string, as netns.As, want string) {
		t.Helper()
		got, err := from.Dial(t, addr, as)
		if err != nil {
			t.Errorf("dial %s as uid %d: %v", addr, as.UID, err)
			return
		}
		t.Logf("dial %s as uid %d gid %d: %s", addr, as.UID, as.GID, got)
		if !strings.HasPrefix(got, want) {
			t.Errorf("dial %s as uid %d: got %q, want %q", addr, as.UID, got, want)
		}
	}
	for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
		to := hostPort(dst, app)
		// The app's outbound connection is captured by A's proxy.
		expect(a, to, pod, "proxy a-out origdst="+to)
		// The proxy's own connection is not captured in A, but by B's inbound.
		expect(a, to, proxy, "proxy b-in origdst="+to)
		// Only the gid of the proxy is enough to be exempt.
		expect(a, to, netns.As{UID: 1000, GID: proxyAs.GID, Cgroup: cgroup}, "proxy b-in origdst="+to)
		// Excluded inbound port: straight to B's app.
		expect(a, hostPort(dst, appExcluded), proxy, "app b local="+hostPort(dst, appExcluded))
	}
	// The app still sees the address it dialed as its peer.
	for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
		to := hostPort(dst, app)
		got, err := a.Dial(t, to, pod, netns.DialOpts{ShowPeer: true})
		if err != nil || !strings.HasSuffix(got, " peer="+to) {
			t.Errorf("dial %s: got %q, %v; want the peer to read %s", to, got, err, to)
		}
	}
	// Loopback and the pod's own addresses are never captured.
	for _, dst := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"), netns.AV4, netns.AV6} {
		expect(a, hostPort(dst, app), pod, "app a")
	}
	// Excluded outbound CIDRs bypass A's proxy (B's inbound still sees them).
	for _, dst := range []netip.Addr{netns.OtherV4, netns.OtherV6} {
		expect(a, hostPort(dst, app), pod, "proxy b-in origdst="+hostPort(dst, app))
	}
	// A connection straight to the proxy's port has no other destination.
	if !base.TProxy {
		expect(a, hostPort(netns.BV4, redirect.DefaultInboundPort), proxy, "proxy b-in error=")
	}

	// Status explains what captures what.
	for _, p := range []struct {
		pod *netns.Pod
		cfg redirect.Config
	}{{a, cfgA}, {b, cfgB}} {
		st := status(t, p.pod, p.cfg)
		if !st.Installed() {
			t.Errorf("status in %s after install: not installed:\n%s", p.pod.Name, st)
		}
		text := st.String()
		for _, want := range []string{"outbound", "inbound", fmt.Sprint(redirect.DefaultInboundPort)} {
			if !strings.Contains(text, want) {
				t.Errorf("status does not mention %q:\n%s", want, text)
			}
		}
		if t.Failed() {
			t.Logf("status of %s:\n%s", p.pod.Name, text)
		}
	}

	// Installing again is a no-op: nothing is recreated (same nft handles
	// and BPF IDs) and no counter is reset.
	before := snapshot(t, a, cfgA)
	install(t, a, cfgA)
	after := snapshot(t, a, cfgA)
	if len(after) != len(before) {
		t.Errorf("second install changed the live state:\nbefore:\n%v\nafter:\n%v", before, after)
	}
	for i := range min(len(before), len(after)) {
		if before[i].text != after[i].text || after[i].packets < before[i].packets {
			t.Errorf("second install changed %q (%d packets) into %q (%d packets)",
				before[i].text, before[i].packets, after[i].text, after[i].packets)
		}
	}

	// Uninstall leaves nothing behind and traffic flows directly again.
	for _, p := range []struct {
		pod *netns.Pod
		cfg redirect.Config
	}{{a, cfgA}, {b, cfgB}} {
		if err := p.pod.Do(func() error { return redirect.Uninstall(ctx, p.cfg) }); err != nil {
			t.Fatalf("uninstall in %s: %v", p.pod.Name, err)
		}
		netns.AssertNoCapture(t, p.pod, p.cfg)
	}
	expect(a, hostPort(netns.BV4, app), pod, "app b local="+hostPort(netns.BV4, app))
	expect(a, hostPort(netns.BV6, app), pod, "app b local="+hostPort(netns.BV6, app))
}

func install(t *testing.T, p *netns.Pod, cfg redirect.Config) {
	t.Helper()
	if err := p.Do(func() error { return redirect.Install(context.Background(), cfg) }); err != nil {
		t.Fatalf("install %s in %s: %v", cfg.Mode, p.Name, err)
	}
}

func status(t *testing.T, p *netns.Pod, cfg redirect.Config) *redirect.State {
	t.Helper()
	var st *redirect.State
	if err := p.Do(func() (err error) {
		st, err = redirect.Status(context.Background(), cfg)
		return err
	}); err != nil {
		t.Fatalf("status in %s: %v", p.Name, err)
	}
	return st
}

// snapLine is one line of live state and its packet counter.
type snapLine struct {
	text    string
	packets uint64
}

var (
	nftCounter = regexp.MustCompile(`counter packets (\d+) bytes \d+`)
	iptCounter = regexp.MustCompile(`^\[(\d+):\d+\] `)
)

// snapshot captures identities that any re-creation would change: nft rule
// handles, iptables counters (reset by a reload), BPF link and program IDs.
// Counters are split off: late packets may still raise them.
func snapshot(t *testing.T, p *netns.Pod, cfg redirect.Config) []snapLine {
	t.Helper()
	var out []snapLine
	add := func(line string, re *regexp.Regexp) {
		var n uint64
		if m := re.FindStringSubmatch(line); m != nil {
			n, _ = strconv.ParseUint(m[1], 10, 64)
			line = re.ReplaceAllString(line, "counter")
		}
		out = append(out, snapLine{text: line, packets: n})
	}
	if nft, err := p.Exec("nft", "-a", "list", "table", "inet", redirect.TableName); err == nil {
		for _, l := range strings.Split(nft, "\n") {
			add(l, nftCounter)
		}
	}
	if cfg.Mode == redirect.ModeIptables {
		for _, tool := range iptSaveTools(cfg) {
			s, err := p.Exec(tool, "-c")
			if err != nil {
				t.Fatalf("%s: %v\n%s", tool, err, s)
			}
			for _, l := range strings.Split(s, "\n") {
				if strings.Contains(l, "MESHPROXY") {
					add(l, iptCounter)
				}
			}
		}
	}
	if cfg.Mode == redirect.ModeEBPF {
		dir := redirect.PinDir(cfg)
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatalf("read pin dir: %v", err)
		}
		for _, e := range entries {
			path := filepath.Join(dir, e.Name())
			if l, err := link.LoadPinnedLink(path, nil); err == nil {
				info, _ := l.Info()
				out = append(out, snapLine{text: fmt.Sprintf("link %s id %d prog %d", e.Name(), info.ID, info.Program)})
				l.Close()
			} else if pr, err := ebpf.LoadPinnedProgram(path, nil); err == nil {
				info, _ := pr.Info()
				id, _ := info.ID()
				out = append(out, snapLine{text: fmt.Sprintf("prog %s id %d", e.Name(), id)})
				pr.Close()
			} else if m, err := ebpf.LoadPinnedMap(path, nil); err == nil {
				info, _ := m.Info()
				id, _ := info.ID()
				out = append(out, snapLine{text: fmt.Sprintf("map %s id %d", e.Name(), id)})
				m.Close()
			}
		}
	}
	return out
}

func iptSaveTools(cfg redirect.Config) []string {
	b := cfg.IptablesBackend
	return []string{"iptables-" + b + "-save", "ip6tables-" + b + "-save"}
}

// TestInstallFailureLeavesNothing breaks the last step of each install (the
// TPROXY local route cannot be added while lo is down) and checks that the
// steps already done were rolled back.
func TestInstallFailureLeavesNothing(t *testing.T) {
	for _, tc := range []captureCase{
		{name: "nftables", cfg: redirect.Config{Mode: redirect.ModeNftables, TProxy: true}},
		{name: "iptables", cfg: redirect.Config{Mode: redirect.ModeIptables, IptablesBackend: redirect.BackendNft, TProxy: true},
			needs: needTool("iptables-nft-restore", "ip6tables-nft-restore")},
		{name: "ebpf", cfg: redirect.Config{Mode: redirect.ModeEBPF, TProxy: true}, needs: needEBPF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needs != nil {
				tc.needs(t)
			}
			a, _ := netns.NewPair(t)
			netns.Run(t, "ip", "-n", a.Name, "link", "set", "lo", "down")
			cfg := tc.cfg
			if cfg.Mode == redirect.ModeEBPF {
				cfg.CgroupPath = netns.NewCgroup(t)
			}
			err := a.Do(func() error { return redirect.Install(context.Background(), cfg) })
			if err == nil {
				t.Fatal("install succeeded with lo down")
			}
			t.Logf("install failed as expected: %v", err)
			netns.AssertNoCapture(t, a, cfg)
		})
	}
}

// TestInstallReplacesChangedConfig installs one config, then another: the
// second replaces the first instead of adding to it.
func TestInstallReplacesChangedConfig(t *testing.T) {
	for _, tc := range captureCases() {
		if tc.cfg.TProxy {
			continue
		}
		t.Run(tc.name, func(t *testing.T) {
			if tc.needs != nil {
				tc.needs(t)
			}
			a, _ := netns.NewPair(t)
			first, second := tc.cfg, tc.cfg
			if tc.cfg.Mode == redirect.ModeEBPF {
				first.CgroupPath = netns.NewCgroup(t)
				second.CgroupPath = first.CgroupPath
			}
			first.ExcludeInboundPorts = []uint16{7001}
			first.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
			second.ExcludeInboundPorts = []uint16{7002}
			second.ExcludeOutboundCIDRs = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}
			install(t, a, first)
			t.Cleanup(func() { _ = a.Do(func() error { return redirect.Uninstall(context.Background(), second) }) })
			install(t, a, second)
			text := status(t, a, second).String()
			for _, want := range []string{"7002", "203.0.113.0/24"} {
				if !strings.Contains(text, want) {
					t.Errorf("status after reinstall lacks %s:\n%s", want, text)
				}
			}
			for _, old := range []string{"7001", "192.0.2.0/24"} {
				if strings.Contains(text, old) {
					t.Errorf("status after reinstall still has %s:\n%s", old, text)
				}
			}
			if err := a.Do(func() error { return redirect.Uninstall(context.Background(), second) }); err != nil {
				t.Fatal(err)
			}
			netns.AssertNoCapture(t, a, second)
		})
	}
}

// TestEBPFRejectsNonCgroup2Path names the path and what it is instead.
func TestEBPFRejectsNonCgroup2Path(t *testing.T) {
	netns.RequireRoot(t)
	dir := t.TempDir()
	err := redirect.Install(context.Background(), redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: dir})
	if err == nil || !errors.Is(err, redirect.ErrInvalidConfig) || !strings.Contains(err.Error(), dir) ||
		!strings.Contains(err.Error(), "not a cgroup v2 directory") {
		t.Fatalf("Install with a tmpfs path = %v, want ErrInvalidConfig naming %s", err, dir)
	}
}

// TestEBPFCapturesIPv4MappedConnects: an app that connects with an IPv6
// socket to an IPv4-mapped address is captured too, and the proxy learns
// the IPv4 destination.
func TestEBPFCapturesIPv4MappedConnects(t *testing.T) {
	needEBPF(t)
	a, b := netns.NewPair(t)
	cg := netns.NewCgroup(t)
	b.Serve(t, netns.Server{Name: "b", Addrs: []string{fmt.Sprintf(":%d", app)}})
	a.Serve(t, netns.Server{Name: "a-out", Proxy: true, Addrs: []string{":15001"},
		As: netns.As{UID: proxyAs.UID, GID: proxyAs.GID, Cgroup: cg}})
	cfg := redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: cg}
	install(t, a, cfg)
	t.Cleanup(func() { _ = a.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })
	mapped := netip.AddrPortFrom(netip.AddrFrom16(netns.BV4.As16()), app).String()
	got, err := a.Dial(t, mapped, netns.As{UID: 1000, GID: 1000, Cgroup: cg}, netns.DialOpts{Network: "tcp6-mapped", ShowPeer: true})
	// (Go shows the IPv4-mapped peer as plain IPv4.)
	if want := "proxy a-out origdst=" + hostPort(netns.BV4, app) + " peer=" + hostPort(netns.BV4, app); err != nil || got != want {
		t.Fatalf("dial %s over tcp6: got %q, %v; want %q", mapped, got, err, want)
	}
}

// TestIptablesAutoPicksTheBackendInUse: with rules already on the legacy
// backend (as kube-proxy might have left them), auto mode installs there;
// in an empty namespace it uses nft.
func TestIptablesAutoPicksTheBackendInUse(t *testing.T) {
	needTool("iptables-legacy", "iptables-legacy-save", "iptables-nft-save")(t)
	for _, tc := range []struct {
		name, seed, want string
	}{
		{"legacy rules present", "iptables-legacy", "iptables-legacy-save"},
		{"nothing present", "", "iptables-nft-save"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, _ := netns.NewPair(t)
			if tc.seed != "" {
				netns.Run(t, "ip", "netns", "exec", a.Name, tc.seed, "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "ACCEPT")
			}
			cfg := redirect.Config{Mode: redirect.ModeIptables}
			install(t, a, cfg)
			t.Cleanup(func() { _ = a.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }) })
			out, err := a.Exec(tc.want)
			if err != nil || !strings.Contains(out, "MESHPROXY_OUTPUT") {
				t.Fatalf("%s shows no MESHPROXY chains (%v):\n%s", tc.want, err, out)
			}
			if text := status(t, a, cfg).String(); !strings.Contains(text, strings.TrimSuffix(strings.TrimPrefix(tc.want, "iptables-"), "-save")) {
				t.Errorf("status does not name the backend:\n%s", text)
			}
			if err := a.Do(func() error { return redirect.Uninstall(context.Background(), cfg) }); err != nil {
				t.Fatal(err)
			}
			netns.AssertNoCapture(t, a, cfg)
		})
	}
}

// TestEBPFInstallRemovesCapturesOfDeletedCgroups: a pod deleted without an
// uninstall (init-container capture: nobody runs one) leaves its pins
// behind; the next eBPF install on the node removes them, and leaves the
// capture of a pod that still lives alone.
func TestEBPFInstallRemovesCapturesOfDeletedCgroups(t *testing.T) {
	needEBPF(t)
	a, b := netns.NewPair(t)
	dead, live := redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: netns.NewCgroup(t)}, redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: netns.NewCgroup(t)}
	install(t, a, dead)
	t.Cleanup(func() { _ = a.Do(func() error { return redirect.Uninstall(context.Background(), dead) }) })
	install(t, b, live)
	t.Cleanup(func() { _ = b.Do(func() error { return redirect.Uninstall(context.Background(), live) }) })
	if _, err := os.Stat(redirect.PinDir(dead)); err != nil {
		t.Fatalf("the capture is not pinned: %v", err)
	}
	// The pod goes: its cgroup is removed, its capture never uninstalled.
	if err := os.Remove(dead.CgroupPath); err != nil {
		t.Fatalf("remove the pod's cgroup: %v", err)
	}
	// The next pod on the node installs its capture.
	c, _ := netns.NewPair(t)
	next := redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: netns.NewCgroup(t)}
	install(t, c, next)
	t.Cleanup(func() { _ = c.Do(func() error { return redirect.Uninstall(context.Background(), next) }) })
	// The kernel may release the cgroup (and detach its links) a moment
	// after rmdir: installs again (idempotent) sweep again, for a bounded
	// while.
	for i := 0; i < 50; i++ {
		if _, err := os.Stat(redirect.PinDir(dead)); os.IsNotExist(err) {
			break
		}
		time.Sleep(100 * time.Millisecond)
		install(t, c, next)
	}
	if _, err := os.Stat(redirect.PinDir(dead)); !os.IsNotExist(err) {
		t.Errorf("the deleted pod's capture is still pinned at %s (%v)", redirect.PinDir(dead), err)
	}
	for _, cfg := range []redirect.Config{live, next} {
		if _, err := os.Stat(redirect.PinDir(cfg)); err != nil {
			t.Errorf("a live pod's capture was removed: %v", err)
		}
	}
}
