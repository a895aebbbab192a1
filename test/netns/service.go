package netns

import (
	"fmt"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// A Cluster is a node namespace that routes between a client pod and
// endpoint pods, each on a veth pair of its own, and DNATs Service VIPs to
// the endpoints as kube-proxy does on a node: the client's sidecar dials
// the VIP and the node picks an endpoint for each new TCP connection.
//
// Addresses: pod i (0 is the client, 1.. the endpoints) is 198.18.(10+i).2
// and fd00:198:(10+i)::2 behind the node's .1 / ::1.
type Cluster struct {
	Node      string // the node's netns name
	Client    *Pod
	Endpoints []*Pod
}

// Service VIPs of a Cluster: inside the mesh CIDRs, on no interface.
var (
	VIPv4 = netip.MustParseAddr("198.18.100.10")
	VIPv6 = netip.MustParseAddr("fd00:198:100::10")
)

// NewCluster creates the node, the client pod and n endpoint pods, and
// removes them when the test ends.
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	RequireRoot(t)
	base := uniqueName()
	c := &Cluster{Node: base + "-node"}
	Run(t, "ip", "netns", "add", c.Node)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", c.Node).Run() })
	Run(t, "ip", "-n", c.Node, "link", "set", "lo", "up")
	for _, sysctl := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		Run(t, "ip", "netns", "exec", c.Node, "sysctl", "-q", "-w", sysctl)
	}
	for i := 0; i <= n; i++ {
		name := fmt.Sprintf("%s-p%d", base, i)
		p := &Pod{Name: name, Veth: fmt.Sprintf("%sp%d", base, i),
			V4: netip.AddrFrom4([4]byte{198, 18, byte(10 + i), 2}),
			V6: netip.MustParseAddr(fmt.Sprintf("fd00:198:%d::2", 10+i))}
		gw4 := netip.AddrFrom4([4]byte{198, 18, byte(10 + i), 1})
		gw6 := netip.MustParseAddr(fmt.Sprintf("fd00:198:%d::1", 10+i))
		nodeVeth := fmt.Sprintf("%sn%d", base, i)
		Run(t, "ip", "netns", "add", p.Name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
		Run(t, "ip", "link", "add", p.Veth, "netns", p.Name, "type", "veth", "peer", "name", nodeVeth, "netns", c.Node)
		Run(t, "ip", "-n", c.Node, "link", "set", nodeVeth, "up")
		Run(t, "ip", "-n", c.Node, "addr", "add", gw4.String()+"/24", "dev", nodeVeth)
		Run(t, "ip", "-n", c.Node, "addr", "add", gw6.String()+"/64", "dev", nodeVeth, "nodad")
		Run(t, "ip", "-n", p.Name, "link", "set", "lo", "up")
		Run(t, "ip", "-n", p.Name, "link", "set", p.Veth, "up")
		Run(t, "ip", "-n", p.Name, "addr", "add", p.V4.String()+"/24", "dev", p.Veth)
		Run(t, "ip", "-n", p.Name, "addr", "add", p.V6.String()+"/64", "dev", p.Veth, "nodad")
		Run(t, "ip", "-n", p.Name, "route", "add", "default", "via", gw4.String())
		Run(t, "ip", "-n", p.Name, "-6", "route", "add", "default", "via", gw6.String())
		if i == 0 {
			c.Client = p
		} else {
			c.Endpoints = append(c.Endpoints, p)
		}
	}
	return c
}

// AddService DNATs VIPv4:port and VIPv6:port on the node to the endpoints'
// targetPort, round robin over new TCP connections (kube-proxy picks at
// random; round robin makes "every endpoint gets traffic" certain). Each
// endpoint's chain counts the connections sent to it (ServiceHits).
func (c *Cluster) AddService(t testing.TB, port, targetPort uint16) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "table inet meshproxy_test_svc {\n")
	var m4, m6 []string
	for i, ep := range c.Endpoints {
		fmt.Fprintf(&b, "  chain ep%d_v4 { meta l4proto tcp counter dnat ip to %s; }\n", i, netip.AddrPortFrom(ep.V4, targetPort))
		fmt.Fprintf(&b, "  chain ep%d_v6 { meta l4proto tcp counter dnat ip6 to %s; }\n", i, netip.AddrPortFrom(ep.V6, targetPort))
		m4 = append(m4, fmt.Sprintf("%d : goto ep%d_v4", i, i))
		m6 = append(m6, fmt.Sprintf("%d : goto ep%d_v6", i, i))
	}
	fmt.Fprintf(&b, "  chain services {\n    type nat hook prerouting priority dstnat; policy accept;\n")
	fmt.Fprintf(&b, "    ip daddr %s tcp dport %d numgen inc mod %d vmap { %s }\n", VIPv4, port, len(c.Endpoints), strings.Join(m4, ", "))
	fmt.Fprintf(&b, "    ip6 daddr %s tcp dport %d numgen inc mod %d vmap { %s }\n", VIPv6, port, len(c.Endpoints), strings.Join(m6, ", "))
	fmt.Fprintf(&b, "  }\n}\n")
	cmd := exec.Command("ip", "netns", "exec", c.Node, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f (service):\n%s\n%v\n%s", b.String(), err, out)
	}
}

var counterRE = regexp.MustCompile(`chain ep(\d+)_v[46] \{\s*meta l4proto tcp counter packets (\d+)`)

// ServiceHits returns how many TCP connections the node sent to each
// endpoint (both address families).
func (c *Cluster) ServiceHits(t testing.TB) []int {
	t.Helper()
	out := Run(t, "ip", "netns", "exec", c.Node, "nft", "list", "table", "inet", "meshproxy_test_svc")
	hits := make([]int, len(c.Endpoints))
	for _, m := range counterRE.FindAllStringSubmatch(out, -1) {
		i, _ := strconv.Atoi(m[1])
		n, _ := strconv.Atoi(m[2])
		if i < len(hits) {
			hits[i] += n
		}
	}
	return hits
}
