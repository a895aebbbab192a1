package inject

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/ports"
)

// DefaultCAAddr is DefaultCAHost on Istio's CA port (15012).
func DefaultCAAddr() string { return ports.HostPort(DefaultCAHost, ports.CA) }

// Mode is the traffic capture mechanism the init container installs.
type Mode string

// Capture mechanisms of `meshproxy redirect install --mode`.
const (
	ModeNFTables Mode = "nftables"
	ModeIPTables Mode = "iptables"
	ModeEBPF     Mode = "ebpf"
)

// ParseMode checks a --mode value.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ModeNFTables, ModeIPTables, ModeEBPF:
		return m, nil
	}
	return "", fmt.Errorf("mode %q: want nftables, iptables or ebpf", s)
}

// Defaults.
const (
	// DefaultCAHost is the CA's Service; DefaultCAAddr adds Istio's CA port.
	DefaultCAHost   = "meshproxy-ca.istio-system.svc"
	DefaultProxyUID = ports.ProxyUID
	DefaultMode     = ModeNFTables
	// DefaultEBPFCgroup is the pod's cgroup v2 directory as seen through the
	// host cgroup mount, for kubelet's cgroupfs driver. Every injected pod is
	// Burstable (the sidecar requests less than its limit), hence the QoS
	// level. $(POD_UID) is expanded by the kubelet from the downward API.
	DefaultEBPFCgroup = hostCgroupMount + "/kubepods/burstable/pod$(POD_UID)"
	// EBPFCgroupAuto has the init container find the pod's cgroup itself
	// (meshproxy redirect install --cgroup auto --pod-uid UID).
	EBPFCgroupAuto = "auto"
	// releaseRepository is where tagged releases of the image are published.
	releaseRepository = "ghcr.io/meshproxy/meshproxy"
)

// DefaultImage is the image for a meshproxy binary of the given version:
// the locally built meshproxy:dev for development builds, the published
// image of that version otherwise.
func DefaultImage(version string) string {
	if version == "" || version == "dev" {
		return "meshproxy:dev"
	}
	return releaseRepository + ":" + version
}

// Option configures an Injector.
type Option func(*config) error

type config struct {
	image                string
	caAddr               string
	configServer         string
	meshCIDRs            []netip.Prefix
	excludeInboundPorts  []uint16
	excludeOutboundCIDRs []netip.Prefix
	mode                 Mode
	proxyUID             int64
	version              string
	native               bool
	ebpfCgroup           string
	imageSet             bool
	capture              Capture
	ebpfCgroupSet        bool
	csrTrustDomain       string
}

// WithImage sets the image of both injected containers.
func WithImage(image string) Option {
	return func(c *config) error {
		if image == "" || strings.ContainsAny(image, " \t\r\n") {
			return fmt.Errorf("image %q: want a non-empty image reference without spaces", image)
		}
		c.image, c.imageSet = image, true
		return nil
	}
}

// WithCAAddr sets the CA the sidecar asks for certificates (HOST:PORT).
func WithCAAddr(addr string) Option {
	return func(c *config) error {
		if err := checkHostPort(addr); err != nil {
			return fmt.Errorf("ca address: %w", err)
		}
		c.caAddr = addr
		return nil
	}
}

// WithCSRTrustDomain makes the sidecar name its SPIFFE ID,
// spiffe://TD/ns/NAMESPACE/sa/SERVICE-ACCOUNT, in every CSR to the CA
// (run --ca-spiffe-id), as Istio's agents do. A CA with --signer
// certmanager needs it: cert-manager signs the CSR as it is.
func WithCSRTrustDomain(td string) Option {
	return func(c *config) error {
		if _, err := spiffeid.TrustDomainFromString(td); err != nil || strings.Contains(td, "://") {
			return fmt.Errorf("csr trust domain %q: want a trust domain name such as cluster.local", td)
		}
		c.csrTrustDomain = td
		return nil
	}
}

// WithConfigServer makes the sidecar follow the Istio config mirror of the
// CA at addr (HOST:PORT, run --config-server): the policy directory becomes
// a writable in-memory emptyDir instead of the meshproxy-policy ConfigMap,
// and `kubectl apply` of Istio policy reaches the sidecar within seconds.
func WithConfigServer(addr string) Option {
	return func(c *config) error {
		if err := checkHostPort(addr); err != nil {
			return fmt.Errorf("config server address: %w", err)
		}
		c.configServer = addr
		return nil
	}
}

// WithMeshCIDRs sets the outbound destinations that get mesh mTLS.
func WithMeshCIDRs(cidrs ...netip.Prefix) Option {
	return func(c *config) error {
		if err := checkPrefixes(cidrs); err != nil {
			return fmt.Errorf("mesh cidrs: %w", err)
		}
		c.meshCIDRs = slices.Clone(cidrs)
		return nil
	}
}

// WithExcludeInboundPorts leaves inbound traffic to these ports uncaptured.
func WithExcludeInboundPorts(ports ...uint16) Option {
	return func(c *config) error {
		if slices.Contains(ports, 0) {
			return errors.New("exclude inbound ports: port 0: ports are 1-65535")
		}
		c.excludeInboundPorts = slices.Clone(ports)
		return nil
	}
}

// WithExcludeOutboundCIDRs leaves outbound traffic to these ranges uncaptured.
func WithExcludeOutboundCIDRs(cidrs ...netip.Prefix) Option {
	return func(c *config) error {
		if err := checkPrefixes(cidrs); err != nil {
			return fmt.Errorf("exclude outbound cidrs: %w", err)
		}
		c.excludeOutboundCIDRs = slices.Clone(cidrs)
		return nil
	}
}

// WithMode sets the capture mechanism (default nftables).
func WithMode(m Mode) Option {
	return func(c *config) error {
		if _, err := ParseMode(string(m)); err != nil {
			return err
		}
		c.mode = m
		return nil
	}
}

// WithProxyUID sets the uid and gid the sidecar runs as; the capture rules
// exempt its traffic.
func WithProxyUID(uid int64) Option {
	return func(c *config) error {
		if uid <= 0 || uid > 1<<31-1 {
			return fmt.Errorf("proxy uid %d: want 1-2147483647 (the proxy never runs as root)", uid)
		}
		c.proxyUID = uid
		return nil
	}
}

// WithVersion records the meshproxy version in the status annotation and
// picks the default image (see DefaultImage).
func WithVersion(v string) Option {
	return func(c *config) error {
		if v == "" {
			return errors.New("version is empty")
		}
		c.version = v
		return nil
	}
}

// WithNativeSidecar chooses a native sidecar (init container with
// restartPolicy: Always, Kubernetes 1.29+; the default) or a regular
// container.
func WithNativeSidecar(native bool) Option {
	return func(c *config) error {
		c.native = native
		return nil
	}
}

// WithEBPFCgroup sets the --cgroup path the init container passes in ebpf
// mode: the pod's cgroup v2 directory below the host cgroup mount
// (/host/sys/fs/cgroup); $(POD_UID) is expanded by the kubelet. "auto" has
// the init container find the pod's cgroup by its UID, whatever the node's
// cgroup driver, cgroupRoot and cgroup version layout.
func WithEBPFCgroup(path string) Option {
	return func(c *config) error {
		if path == EBPFCgroupAuto {
			c.ebpfCgroup = path
			return nil
		}
		if !strings.HasPrefix(path, hostCgroupMount+"/") || strings.Contains(path, "..") {
			return fmt.Errorf("ebpf cgroup %q: want a directory below %s (the host cgroup mount)", path, hostCgroupMount)
		}
		c.ebpfCgroup, c.ebpfCgroupSet = path, true
		return nil
	}
}

// ParsePrefixes parses comma-separated or repeated CIDR values. A prefix
// with host bits set is refused rather than silently masked.
func ParsePrefixes(values []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range splitList(values) {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR (want e.g. 10.0.0.0/8)", v)
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%q has host bits set (did you mean %s?)", v, p.Masked())
		}
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

// ParsePorts parses comma-separated or repeated port numbers (1-65535).
func ParsePorts(values []string) ([]uint16, error) {
	var out []uint16
	for _, v := range splitList(values) {
		n, err := strconv.ParseUint(v, 10, 16)
		if err != nil || n == 0 {
			return nil, fmt.Errorf("%q is not a port (want 1-65535)", v)
		}
		if !slices.Contains(out, uint16(n)) {
			out = append(out, uint16(n))
		}
	}
	return out, nil
}

// splitList flattens "a,b" and repeated values, dropping empty items.
func splitList(values []string) []string {
	var out []string
	for _, v := range values {
		for item := range strings.SplitSeq(v, ",") {
			if item = strings.TrimSpace(item); item != "" {
				out = append(out, item)
			}
		}
	}
	return out
}

func checkPrefixes(cidrs []netip.Prefix) error {
	for _, p := range cidrs {
		if !p.IsValid() {
			return fmt.Errorf("invalid prefix %v", p)
		}
		if p != p.Masked() {
			return fmt.Errorf("%s has host bits set (did you mean %s?)", p, p.Masked())
		}
	}
	return nil
}

func checkHostPort(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want HOST:PORT: %w", addr, err)
	}
	if host == "" || strings.ContainsAny(host, " \t\r\n/") {
		return fmt.Errorf("%q: missing or invalid host", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("%q: port %q is not 1-65535", addr, port)
	}
	return nil
}
