package netns

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/meshproxy/meshproxy/redirect"
)

// AssertNoCapture lists, independently of the package, every place the
// capture could leave something: nftables, iptables (both backends), rules
// matching or setting the TPROXY mark or connmark anywhere, ip rules and
// routes of the TPROXY table, BPF pins and cgroup attachments.
func AssertNoCapture(t testing.TB, p *Pod, cfg redirect.Config) {
	t.Helper()
	mark := cfg.TProxyMark
	if mark == 0 {
		mark = redirect.DefaultTProxyMark
	}
	if out, err := p.Exec("nft", "list", "ruleset"); err != nil {
		t.Errorf("nft list ruleset: %v\n%s", err, out)
	} else if strings.Contains(out, redirect.TableName) || strings.Contains(out, fmt.Sprintf("%#08x", mark)) ||
		strings.Contains(out, "ct mark") {
		t.Errorf("nftables table or mark rules left behind in %s:\n%s", p.Name, out)
	}
	if err := p.Do(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		tables, err := c.ListTables()
		if err != nil {
			return err
		}
		for _, tb := range tables {
			if tb.Name == redirect.TableName {
				t.Errorf("nftables table %s left behind", tb.Name)
			}
		}
		return nil
	}); err != nil {
		t.Errorf("list nftables: %v", err)
	}
	for _, tool := range []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			continue
		}
		out, err := p.Exec(tool)
		if err != nil {
			t.Errorf("%s: %v\n%s", tool, err, out)
		} else if strings.Contains(out, "MESHPROXY") || strings.Contains(out, "CONNMARK") ||
			strings.Contains(out, fmt.Sprintf("--mark %#x", mark)) {
			t.Errorf("%s shows rules left behind:\n%s", tool, out)
		}
	}
	if err := p.Do(func() error {
		for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			rules, err := netlink.RuleList(fam)
			if err != nil {
				return err
			}
			for _, r := range rules {
				if r.Table == redirect.DefaultRouteTable || r.Mark == redirect.DefaultTProxyMark {
					t.Errorf("ip rule left behind: %+v", r)
				}
			}
			routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: redirect.DefaultRouteTable}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return err
			}
			if len(routes) > 0 {
				t.Errorf("routes left in table %d: %+v", redirect.DefaultRouteTable, routes)
			}
		}
		return nil
	}); err != nil {
		t.Errorf("list ip rules: %v", err)
	}
	if cfg.Mode == redirect.ModeEBPF {
		if _, err := os.Stat(redirect.PinDir(cfg)); !os.IsNotExist(err) {
			t.Errorf("pin directory %s left behind (stat: %v)", redirect.PinDir(cfg), err)
		}
		f, err := os.Open(cfg.CgroupPath)
		if err != nil {
			t.Fatalf("open cgroup: %v", err)
		}
		defer f.Close()
		for _, at := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
			ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: at})
			if err != nil {
				t.Errorf("query cgroup programs (%s): %v", at, err)
				continue
			}
			if len(res.Programs) > 0 {
				t.Errorf("programs still attached to the cgroup at %s: %+v", at, res.Programs)
			}
		}
	}
}
