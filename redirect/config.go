package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/meshproxy/meshproxy/internal/ports"
)

// Mode selects the capture mechanism.
type Mode string

// Capture mechanisms.
const (
	ModeNftables Mode = "nftables"
	ModeIptables Mode = "iptables"
	ModeEBPF     Mode = "ebpf"
)

// Modes lists every capture mechanism, default first.
var Modes = []Mode{ModeNftables, ModeIptables, ModeEBPF}

// Iptables backends for Config.IptablesBackend.
const (
	BackendAuto   = "auto"
	BackendNft    = "nft"
	BackendLegacy = "legacy"
)

// Defaults: Istio's numbers (internal/ports; docs/CONTRACT.md, "Ports").
const (
	DefaultProxyUID     = ports.ProxyUID
	DefaultProxyGID     = ports.ProxyGID
	DefaultInboundPort  = ports.Inbound
	DefaultOutboundPort = ports.Outbound
	DefaultTProxyMark   = 0x539 // 1337, as Istio
	DefaultRouteTable   = 133   // as Istio
	DefaultBPFFS        = "/sys/fs/bpf"
)

// ProxyPorts are the sidecar's own ports; inbound traffic to them is never
// captured (HBONE, admin, metrics, health, Envoy-compatible stats, and the
// capture ports themselves).
var ProxyPorts = ports.Proxy()

// ErrInvalidConfig is wrapped by every Config validation error.
var ErrInvalidConfig = errors.New("invalid redirect config")

// Config describes the capture to install. Zero fields take the defaults
// above (a zero ProxyUID or ProxyGID means 1337: exempting root's traffic
// from capture is never what a pod wants).
type Config struct {
	Mode                 Mode           // nftables (default), iptables or ebpf
	ProxyUID             uint32         // owner of the proxy's own traffic, never captured
	ProxyGID             uint32         // group of the proxy's own traffic, never captured
	InboundPort          uint16         // where inbound TCP is redirected
	OutboundPort         uint16         // where outbound TCP is redirected
	ExcludeInboundPorts  []uint16       // inbound destination ports left alone
	ExcludeOutboundCIDRs []netip.Prefix // outbound destinations left alone
	TProxy               bool           // inbound by TPROXY instead of REDIRECT
	CgroupPath           string         // ebpf: the pod's cgroup v2 directory
	IptablesBackend      string         // iptables: auto (default), nft or legacy
	TProxyMark           uint32         // TProxy: packet mark routed to the local table
	RouteTable           int            // TProxy: policy routing table number
	BPFFS                string         // ebpf: bpffs mount where programs are pinned
}

// withDefaults returns c with zero fields set to their defaults.
func (c Config) withDefaults() Config {
	if c.Mode == "" {
		c.Mode = ModeNftables
	}
	if c.ProxyUID == 0 {
		c.ProxyUID = DefaultProxyUID
	}
	if c.ProxyGID == 0 {
		c.ProxyGID = DefaultProxyGID
	}
	if c.InboundPort == 0 {
		c.InboundPort = DefaultInboundPort
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = DefaultOutboundPort
	}
	if c.Mode == ModeIptables && c.IptablesBackend == "" {
		c.IptablesBackend = BackendAuto
	}
	if c.TProxyMark == 0 {
		c.TProxyMark = DefaultTProxyMark
	}
	if c.RouteTable == 0 {
		c.RouteTable = DefaultRouteTable
	}
	if c.BPFFS == "" {
		c.BPFFS = DefaultBPFFS
	}
	cidrs := make([]netip.Prefix, 0, len(c.ExcludeOutboundCIDRs))
	for _, p := range c.ExcludeOutboundCIDRs {
		cidrs = append(cidrs, p.Masked())
	}
	c.ExcludeOutboundCIDRs = cidrs
	return c
}

// Validate reports the first problem with c, naming the bad value. It
// applies the defaults first, so a zero Config is valid.
func (c Config) Validate() error {
	c = c.withDefaults()
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidConfig, fmt.Sprintf(format, args...))
	}
	if !slices.Contains(Modes, c.Mode) {
		return bad("mode %q: want one of nftables, iptables, ebpf", c.Mode)
	}
	if c.InboundPort == c.OutboundPort {
		return bad("inbound port %d equals outbound port", c.InboundPort)
	}
	for _, p := range c.ExcludeInboundPorts {
		if p == 0 {
			return bad("exclude inbound port 0: ports are 1-65535")
		}
	}
	for _, p := range c.ExcludeOutboundCIDRs {
		if !p.IsValid() {
			return bad("exclude outbound CIDR %q is not a valid prefix", p)
		}
	}
	switch c.IptablesBackend {
	case "", BackendAuto, BackendNft, BackendLegacy:
	default:
		return bad("iptables backend %q: want auto, nft or legacy", c.IptablesBackend)
	}
	if c.IptablesBackend != "" && c.Mode != ModeIptables {
		return bad("iptables backend %q given for mode %s", c.IptablesBackend, c.Mode)
	}
	if c.Mode == ModeEBPF {
		if c.CgroupPath == "" {
			return bad("mode ebpf needs the pod's cgroup v2 path")
		}
		if !filepath.IsAbs(c.CgroupPath) {
			return bad("cgroup path %q is not absolute", c.CgroupPath)
		}
	} else if c.CgroupPath != "" {
		return bad("cgroup path %q given for mode %s (only ebpf uses it)", c.CgroupPath, c.Mode)
	}
	if !filepath.IsAbs(c.BPFFS) {
		return bad("bpffs path %q is not absolute", c.BPFFS)
	}
	if c.RouteTable < 1 || c.RouteTable > 0xfffffffe || c.RouteTable == 253 || c.RouteTable == 254 || c.RouteTable == 255 {
		return bad("route table %d: want a free table (not 0, 253 default, 254 main, 255 local)", c.RouteTable)
	}
	return nil
}

// inboundExcluded returns the inbound destination ports never captured:
// the proxy's ports, the capture ports and ExcludeInboundPorts, sorted.
func (c Config) inboundExcluded() []uint16 {
	ports := slices.Concat(ProxyPorts, []uint16{c.InboundPort, c.OutboundPort}, c.ExcludeInboundPorts)
	slices.Sort(ports)
	return slices.Compact(ports)
}

// excludedCIDRs returns the ExcludeOutboundCIDRs of one family (4 or 6).
func (c Config) excludedCIDRs(family int) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range c.ExcludeOutboundCIDRs {
		if (family == 4) == p.Addr().Is4() {
			out = append(out, p)
		}
	}
	return out
}

// ParsePorts parses a comma-separated port list ("80,443"); blanks are
// skipped. Errors name the bad entry.
func ParsePorts(s string) ([]uint16, error) {
	var out []uint16
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.ParseUint(f, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%w: port %q: want 1-65535", ErrInvalidConfig, f)
		}
		out = append(out, uint16(n))
	}
	return out, nil
}

// ParseCIDRs parses a comma-separated list of CIDRs or bare addresses
// ("10.0.0.0/8,fd00::/8,192.0.2.1"); blanks are skipped. Errors name the bad
// entry.
func ParseCIDRs(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("%w: CIDR %q: %v", ErrInvalidConfig, f, err)
			}
			out = append(out, netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%w: CIDR %q: %v", ErrInvalidConfig, f, err)
		}
		if p.Addr().Is4In6() {
			return nil, fmt.Errorf("%w: CIDR %q: IPv4-mapped prefixes are not supported, write the IPv4 prefix", ErrInvalidConfig, f)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}
