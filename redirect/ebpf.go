package redirect

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Why the getsockopt path and not a user-space map lookup: a
// cgroup/getsockopt program lets the proxy ask for SO_ORIGINAL_DST exactly
// as under netfilter REDIRECT, so OriginalDst needs no mode switch and no
// access to bpffs, and the proxy needs no CAP_BPF. The kernel runs it for
// sockets created in the pod's cgroup (the proxy's listener included) since
// Linux 5.3; the record is keyed by the client's address because the
// accepted socket cannot see the client socket's cookie.

// bpfAttachment is one program of the capture and where it hooks in.
type bpfAttachment struct {
	name   string // pin name of the link; the program is pinned as prog_<name>
	attach ebpf.AttachType
	prog   func(*captureObjects) *ebpf.Program
}

var bpfAttachments = []bpfAttachment{
	{"connect4", ebpf.AttachCGroupInet4Connect, func(o *captureObjects) *ebpf.Program { return o.MpConnect4 }},
	{"connect6", ebpf.AttachCGroupInet6Connect, func(o *captureObjects) *ebpf.Program { return o.MpConnect6 }},
	{"sockops", ebpf.AttachCGroupSockOps, func(o *captureObjects) *ebpf.Program { return o.MpSockops }},
	{"getsockopt", ebpf.AttachCGroupGetsockopt, func(o *captureObjects) *ebpf.Program { return o.MpGetsockopt }},
	{"getpeername4", ebpf.AttachCgroupInet4GetPeername, func(o *captureObjects) *ebpf.Program { return o.MpGetpeername4 }},
	{"getpeername6", ebpf.AttachCgroupInet6GetPeername, func(o *captureObjects) *ebpf.Program { return o.MpGetpeername6 }},
}

// bpfMaps are the maps we pin, by their names in capture.c.
var bpfMaps = []string{"config_map", "origin_by_cookie", "origin_by_addr", "exclude_v4", "exclude_v6"}

// PinDir returns where the eBPF capture for cfg's cgroup is pinned:
// <bpffs>/meshproxy/<cgroup base name>-<hash of the cgroup path>.
func PinDir(cfg Config) string {
	cfg = cfg.withDefaults()
	return filepath.Join(cfg.BPFFS, "meshproxy", cgroupPinName(cfg.CgroupPath))
}

func cgroupPinName(path string) string {
	clean := filepath.Clean(path)
	sum := sha256.Sum256([]byte(clean))
	base := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '_'
	}, filepath.Base(clean))
	if len(base) > 48 {
		base = base[:48]
	}
	return base + "-" + hex.EncodeToString(sum[:4])
}

// checkCgroup2 verifies that path is a directory of the cgroup v2 hierarchy.
func checkCgroup2(path string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("%w: cgroup path %q: %w", ErrInvalidConfig, path, err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%w: cgroup path %q is not a cgroup v2 directory (filesystem magic %#x, want cgroup2 %#x)",
			ErrInvalidConfig, path, st.Type, unix.CGROUP2_SUPER_MAGIC)
	}
	return nil
}

// ensureBPFFS mounts bpffs at dir unless it is one already.
func ensureBPFFS(dir string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return permission(fmt.Errorf("mount bpffs at %s: %w", dir, err), "CAP_SYS_ADMIN")
	}
	return nil
}

// checkBPFSupport names the first missing kernel feature.
func checkBPFSupport() error {
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupSockAddr, ebpf.SockOps, ebpf.CGroupSockopt} {
		if err := features.HaveProgramType(pt); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return fmt.Errorf("%w: BPF program type %s: %w", ErrUnsupported, pt, err)
			}
			return permission(fmt.Errorf("probe BPF program type %s: %w", pt, err), "CAP_BPF and CAP_NET_ADMIN")
		}
	}
	if err := features.HaveMapType(ebpf.LPMTrie); err != nil && errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("%w: BPF LPM trie maps: %w", ErrUnsupported, err)
	}
	return nil
}

// bpfConfigValue is what config_map should hold for cfg.
func bpfConfigValue(cfg Config) captureConfig {
	return captureConfig{ProxyUid: cfg.ProxyUID, ProxyGid: cfg.ProxyGID, OutboundPort: cfg.OutboundPort}
}

func lpmKey4(p netip.Prefix) captureLpmV4 {
	a := p.Addr().As4()
	return captureLpmV4{Prefixlen: uint32(p.Bits()), Addr: nativeEndian.Uint32(a[:])}
}

func lpmKey6(p netip.Prefix) captureLpmV6 {
	a := p.Addr().As16()
	k := captureLpmV6{Prefixlen: uint32(p.Bits())}
	for i := range k.Addr {
		k.Addr[i] = nativeEndian.Uint32(a[4*i:])
	}
	return k
}

// syncBPFMaps makes config_map and the exclusion tries hold exactly cfg's
// values. It reports whether it changed anything.
func syncBPFMaps(cfg Config, configMap, ex4, ex6 *ebpf.Map) (bool, error) {
	local, err := localPrefixes()
	if err != nil {
		return false, err
	}
	changed := false
	var cur captureConfig
	want := bpfConfigValue(cfg)
	if err := configMap.Lookup(uint32(0), &cur); err != nil || cur != want {
		if err := configMap.Put(uint32(0), want); err != nil {
			return false, fmt.Errorf("write config map: %w", err)
		}
		changed = true
	}
	var want4 []captureLpmV4
	var want6 []captureLpmV6
	for _, p := range slices.Concat(cfg.ExcludeOutboundCIDRs, local) {
		if p.Addr().Is4() {
			want4 = append(want4, lpmKey4(p))
		} else {
			want6 = append(want6, lpmKey6(p))
		}
	}
	c4, err := syncSet(ex4, want4)
	if err != nil {
		return false, fmt.Errorf("sync IPv4 exclusions: %w", err)
	}
	c6, err := syncSet(ex6, want6)
	if err != nil {
		return false, fmt.Errorf("sync IPv6 exclusions: %w", err)
	}
	return changed || c4 || c6, nil
}

// localPrefixes returns the namespace's own addresses (as host prefixes):
// like loopback, traffic to the pod itself is not captured, as under
// netfilter where it leaves through lo.
func localPrefixes() ([]netip.Prefix, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list the pod's addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.IsLoopback() {
			continue
		}
		ip = ip.Unmap()
		out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
	}
	return out, nil
}

// syncSet makes the keys of m exactly want (values are 1).
func syncSet[K comparable](m *ebpf.Map, want []K) (bool, error) {
	wanted := map[K]bool{}
	for _, k := range want {
		wanted[k] = true
	}
	var stale []K
	var k K
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if wanted[k] {
			delete(wanted, k)
		} else {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return false, fmt.Errorf("read map: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil {
			return false, fmt.Errorf("delete entry: %w", err)
		}
	}
	for k := range wanted {
		if err := m.Put(k, uint8(1)); err != nil {
			return false, fmt.Errorf("add entry: %w", err)
		}
	}
	return len(stale) > 0 || len(wanted) > 0, nil
}

// pinnedCapture is an installed capture opened from bpffs.
type pinnedCapture struct {
	links map[string]link.Link
	progs map[string]*ebpf.Program
	maps  map[string]*ebpf.Map
}

func (p *pinnedCapture) close() {
	for _, l := range p.links {
		l.Close()
	}
	for _, pr := range p.progs {
		pr.Close()
	}
	for _, m := range p.maps {
		m.Close()
	}
}

func (p *pinnedCapture) complete() bool {
	return len(p.links) == len(bpfAttachments) && len(p.progs) == len(bpfAttachments) && len(p.maps) == len(bpfMaps)
}

// openPinned opens whatever is pinned in dir; nil if dir does not exist.
func openPinned(dir string) (*pinnedCapture, error) {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	p := &pinnedCapture{links: map[string]link.Link{}, progs: map[string]*ebpf.Program{}, maps: map[string]*ebpf.Map{}}
	for _, a := range bpfAttachments {
		if l, err := link.LoadPinnedLink(filepath.Join(dir, a.name), nil); err == nil {
			p.links[a.name] = l
		} else if !errors.Is(err, os.ErrNotExist) {
			p.close()
			return nil, permission(fmt.Errorf("open pinned link %s: %w", a.name, err), "CAP_BPF")
		}
		if pr, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "prog_"+a.name), nil); err == nil {
			p.progs[a.name] = pr
		} else if !errors.Is(err, os.ErrNotExist) {
			p.close()
			return nil, permission(fmt.Errorf("open pinned program %s: %w", a.name, err), "CAP_BPF")
		}
	}
	for _, name := range bpfMaps {
		if m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil); err == nil {
			p.maps[name] = m
		} else if !errors.Is(err, os.ErrNotExist) {
			p.close()
			return nil, permission(fmt.Errorf("open pinned map %s: %w", name, err), "CAP_BPF")
		}
	}
	return p, nil
}

// removePinned detaches and unpins everything in dir, then removes dir
// (and the meshproxy directory above it when it is empty).
func removePinned(dir string) error {
	p, err := openPinned(dir)
	if err != nil || p == nil {
		return err
	}
	var errs []error
	for name, l := range p.links {
		// Unpinning drops bpffs's reference; closing ours detaches.
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin link %s: %w", name, err))
		}
	}
	for name, pr := range p.progs {
		if err := pr.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin program %s: %w", name, err))
		}
	}
	for name, m := range p.maps {
		if err := m.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin map %s: %w", name, err))
		}
	}
	p.close()
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove pin directory: %w", err))
	}
	_ = os.Remove(filepath.Dir(dir)) // only succeeds when no other pod's pins remain
	return errors.Join(errs...)
}

// RemoveDetached removes, under bpffs/meshproxy, the pinned captures whose
// cgroup is gone: the kernel detaches a cgroup's links when the cgroup is
// released (a deleted pod), and then reports cgroup id 0 for them, but the
// pins keep the programs and maps alive until someone unpins them. A capture
// with any link still attached is left alone, so this is safe to run beside
// live pods and other processes' captures. It returns the directories it
// removed; an error on one does not stop the others.
func RemoveDetached(bpffs string) ([]string, error) {
	if bpffs == "" {
		bpffs = DefaultBPFFS
	}
	dirs, err := filepath.Glob(filepath.Join(bpffs, "meshproxy", "*"))
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, dir := range dirs {
		p, err := openPinned(dir)
		if err != nil || p == nil {
			continue
		}
		detached := len(p.links) > 0
		for _, l := range p.links {
			info, err := l.Info()
			if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != 0 {
				detached = false
			}
		}
		p.close()
		if !detached {
			continue
		}
		if err := removePinned(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove detached capture %s: %w", dir, err))
			continue
		}
		removed = append(removed, dir)
	}
	return removed, errors.Join(errs...)
}

// installBPF loads, attaches and pins the programs, or, when a complete
// capture is pinned already, brings its maps up to date. It reports whether
// it created the capture (so a later failure knows to remove it).
func installBPF(cfg Config) (created bool, err error) {
	dir := PinDir(cfg)
	existing, err := openPinned(dir)
	if err != nil {
		return false, err
	}
	if existing != nil {
		if existing.complete() {
			defer existing.close()
			_, err := syncBPFMaps(cfg, existing.maps["config_map"], existing.maps["exclude_v4"], existing.maps["exclude_v6"])
			return false, err
		}
		existing.close()
		if err := removePinned(dir); err != nil { // a partial capture from a crash
			return false, err
		}
	}
	var objs captureObjects
	if err := loadCaptureObjects(&objs, nil); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			return false, fmt.Errorf("%w: load eBPF capture programs: %w", ErrUnsupported, err)
		}
		return false, permission(fmt.Errorf("load eBPF capture programs: %w", err), "CAP_BPF and CAP_NET_ADMIN")
	}
	defer objs.Close()
	if _, err := syncBPFMaps(cfg, objs.ConfigMap, objs.ExcludeV4, objs.ExcludeV6); err != nil {
		return false, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("create pin directory: %w", err)
	}
	fail := func(err error) (bool, error) {
		return false, errors.Join(err, removePinned(dir))
	}
	maps := map[string]*ebpf.Map{"config_map": objs.ConfigMap, "origin_by_cookie": objs.OriginByCookie,
		"origin_by_addr": objs.OriginByAddr, "exclude_v4": objs.ExcludeV4, "exclude_v6": objs.ExcludeV6}
	for _, name := range bpfMaps {
		if err := maps[name].Pin(filepath.Join(dir, name)); err != nil {
			return fail(fmt.Errorf("pin map %s: %w", name, err))
		}
	}
	for _, a := range bpfAttachments {
		prog := a.prog(&objs)
		if err := prog.Pin(filepath.Join(dir, "prog_"+a.name)); err != nil {
			return fail(fmt.Errorf("pin program %s: %w", a.name, err))
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cfg.CgroupPath, Attach: a.attach, Program: prog})
		if err != nil {
			err = fmt.Errorf("attach %s to cgroup %s: %w", a.name, cfg.CgroupPath, err)
			if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.EINVAL) {
				return fail(fmt.Errorf("%w (cgroup %s hook and bpf_link need Linux 5.8+): %w", ErrUnsupported, a.name, err))
			}
			return fail(permission(err, "CAP_BPF and CAP_NET_ADMIN"))
		}
		err = l.Pin(filepath.Join(dir, a.name))
		l.Close() // pinned: stays attached; not pinned: detached now
		if err != nil {
			return fail(fmt.Errorf("pin link %s (kernel without bpf_link?): %w", a.name, err))
		}
	}
	return true, nil
}

func installEBPF(_ context.Context, cfg Config) error {
	if err := checkCgroup2(cfg.CgroupPath); err != nil {
		return err
	}
	if err := checkBPFSupport(); err != nil {
		return err
	}
	if err := ensureBPFFS(cfg.BPFFS); err != nil {
		return err
	}
	created, err := installBPF(cfg)
	if err != nil {
		return err
	}
	// Pods deleted since (init-container capture has no one to uninstall
	// it) left their pins behind; each install sweeps them.
	_, _ = RemoveDetached(cfg.withDefaults().BPFFS)
	// Inbound capture: the nftables prerouting rule (or TPROXY).
	if err := installNftables(context.Background(), cfg); err != nil {
		if created {
			err = errors.Join(err, removePinned(PinDir(cfg)))
		}
		return err
	}
	return nil
}

func uninstallEBPF(_ context.Context, cfg Config) error {
	var errs []error
	var st unix.Statfs_t
	if err := unix.Statfs(cfg.BPFFS, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		errs = append(errs, removePinned(PinDir(cfg)))
	}
	errs = append(errs, uninstallNftables(context.Background(), cfg))
	return errors.Join(errs...)
}

func statusEBPF(_ context.Context, cfg Config, st *State) error {
	dir := PinDir(cfg)
	var p *pinnedCapture
	var st2 unix.Statfs_t
	if err := unix.Statfs(cfg.BPFFS, &st2); err == nil && st2.Type == unix.BPF_FS_MAGIC {
		var err error
		if p, err = openPinned(dir); err != nil {
			return err
		}
	}
	if p == nil {
		p = &pinnedCapture{}
	}
	defer p.close()
	attached := attachedProgramIDs(cfg.CgroupPath)
	sec := Section{Title: fmt.Sprintf("eBPF on cgroup %s (pinned in %s)", cfg.CgroupPath, dir)}
	for _, a := range bpfAttachments {
		l, ok := p.links[a.name]
		if !ok {
			continue
		}
		info, err := l.Info()
		if err != nil {
			return fmt.Errorf("read link %s: %w", a.name, err)
		}
		state := "NOT attached to this cgroup"
		if slices.Contains(attached[a.attach], info.Program) {
			state = "attached"
		}
		sec.Lines = append(sec.Lines, fmt.Sprintf("%-10s link %d → program %d (%s)", a.name, info.ID, info.Program, state))
	}
	if m := p.maps["config_map"]; m != nil {
		var c captureConfig
		if err := m.Lookup(uint32(0), &c); err == nil {
			sec.Lines = append(sec.Lines, fmt.Sprintf("config: proxy uid %d gid %d exempt, outbound → 127.0.0.1:%d / [::1]:%d",
				c.ProxyUid, c.ProxyGid, c.OutboundPort, c.OutboundPort))
		}
	}
	for _, name := range []string{"exclude_v4", "exclude_v6"} {
		m := p.maps[name]
		if m == nil {
			continue
		}
		var cidrs []string
		it := m.Iterate()
		var v uint8
		if name == "exclude_v4" {
			var k captureLpmV4
			for it.Next(&k, &v) {
				var b [4]byte
				nativeEndian.PutUint32(b[:], k.Addr)
				cidrs = append(cidrs, netip.PrefixFrom(netip.AddrFrom4(b), int(k.Prefixlen)).String())
			}
		} else {
			var k captureLpmV6
			for it.Next(&k, &v) {
				var b [16]byte
				for i, w := range k.Addr {
					nativeEndian.PutUint32(b[4*i:], w)
				}
				cidrs = append(cidrs, netip.PrefixFrom(netip.AddrFrom16(b), int(k.Prefixlen)).String())
			}
		}
		if len(cidrs) > 0 {
			sec.Lines = append(sec.Lines, fmt.Sprintf("%s (excluded CIDRs and the pod's own addresses, not captured): %s", name, strings.Join(cidrs, ", ")))
		}
	}
	if m := p.maps["origin_by_addr"]; m != nil {
		n := 0
		var k captureAddrKey
		var v captureOrigin
		it := m.Iterate()
		for it.Next(&k, &v) && n < 1<<20 {
			n++
		}
		sec.Lines = append(sec.Lines, fmt.Sprintf("origin_by_addr: %d recorded connections (LRU)", n))
	}
	installed := p.complete()
	for _, a := range bpfAttachments {
		if l, ok := p.links[a.name]; ok {
			if info, err := l.Info(); err != nil || !slices.Contains(attached[a.attach], info.Program) {
				installed = false
			}
		}
	}
	if len(sec.Lines) > 0 {
		st.Sections = append(st.Sections, sec)
	}
	st.Mechanisms = append(st.Mechanisms, Mechanism{Direction: "outbound",
		How: fmt.Sprintf("eBPF cgroup/connect4+connect6 on %s: connect() rewritten to 127.0.0.1:%d / [::1]:%d; sockops + cgroup/getsockopt answer SO_ORIGINAL_DST; getpeername4/6 show the original peer",
			cfg.CgroupPath, cfg.OutboundPort, cfg.OutboundPort),
		Installed: installed})
	return statusNftables(context.Background(), cfg, st)
}

// attachedProgramIDs lists the programs attached to the cgroup per hook.
func attachedProgramIDs(cgroup string) map[ebpf.AttachType][]ebpf.ProgramID {
	out := map[ebpf.AttachType][]ebpf.ProgramID{}
	f, err := os.Open(cgroup)
	if err != nil {
		return out
	}
	defer f.Close()
	for _, a := range bpfAttachments {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: a.attach})
		if err != nil {
			continue
		}
		for _, p := range res.Programs {
			out[a.attach] = append(out[a.attach], p.ID)
		}
	}
	return out
}
