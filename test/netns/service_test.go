package netns_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// A pooled connection takes at most this many streams (proxy's
// hbonePoolMaxStreams): past it, the next app connection makes a new TCP
// connection to the VIP, for which the node picks the next endpoint.
const poolMaxStreams = 1000

// TestServiceVIPPoolsOverEndpoints puts a Kubernetes-style Service in front
// of two pods: the node DNATs VIP:80 to the pods' :8080 (one endpoint per
// TCP connection, round robin), and real sidecars with nftables capture run
// in the client and both endpoints under STRICT. Captured app connections
// to the VIP are pooled (few TCP connections cross the node, all app
// connections are HBONE streams, none per-connection mTLS), every answer is
// right, and both endpoints serve once a pooled connection reached its
// stream bound. IPv6 too.
func TestServiceVIPPoolsOverEndpoints(t *testing.T) {
	netns.RequireRoot(t)
	c := netns.NewCluster(t, 2)
	c.AddService(t, 80, appPort)
	ca := testpki.New(t, "cluster.local")
	for i, ep := range c.Endpoints {
		ep.Serve(t, netns.Server{Name: fmt.Sprintf("ep%d", i), Echo: true, Addrs: []string{fmt.Sprintf(":%d", appPort)}})
	}
	flags := []string{"--mode", string(redirect.ModeNftables)}
	for _, p := range append([]*netns.Pod{c.Client}, c.Endpoints...) {
		if out, err := meshproxy(t, p, append([]string{"redirect", "install"}, flags...)...); err != nil {
			t.Fatalf("redirect install in %s: %v\n%s", p.Name, err, out)
		}
		t.Cleanup(func() { _, _ = meshproxy(t, p, append([]string{"redirect", "uninstall"}, flags...)...) })
	}
	startSidecar(t, c.Client, "", "STRICT", identityFiles(t, ca, clientID))
	for _, ep := range c.Endpoints {
		startSidecar(t, ep, "", "STRICT", identityFiles(t, ca, serverID))
	}

	vip4, vip6 := hp(netns.VIPv4, 80), hp(netns.VIPv6, 80)
	served := map[string]int{}
	var mu sync.Mutex
	check := func(addr string, i int) error {
		msg := fmt.Sprintf("hello-%d", i)
		line, err := dialApp(c.Client, addr, msg)
		if err != nil {
			return fmt.Errorf("connection %d to %s: %w", i, addr, err)
		}
		// "app epN local=<pod>:8080 echo=<msg>"
		f := strings.Fields(line)
		if len(f) != 4 || f[0] != "app" || f[3] != "echo="+msg {
			return fmt.Errorf("connection %d to %s: answer %q", i, addr, line)
		}
		local := strings.TrimPrefix(f[2], "local=")
		ep := c.Endpoints[int(f[1][len(f[1])-1]-'0')]
		if want := []string{hp(ep.V4, appPort), hp(ep.V6, appPort)}; local != want[0] && local != want[1] {
			return fmt.Errorf("connection %d to %s: %s answered from %s, want its own address", i, addr, f[1], local)
		}
		mu.Lock()
		served[f[1]]++
		mu.Unlock()
		return nil
	}

	// Sequential, past one pooled connection's stream bound.
	const sequential = poolMaxStreams + 200
	for i := range sequential {
		if err := check(vip4, i); err != nil {
			t.Fatal(err)
		}
	}
	// Concurrent: 8 workers, 50 connections each.
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Go(func() {
			for i := range 50 {
				if err := check(vip4, sequential+w*50+i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// IPv6: its own pooled connections (another key).
	for i := range 20 {
		if err := check(vip6, 10_000+i); err != nil {
			t.Fatal(err)
		}
	}
	total := sequential + 8*50 + 20
	if served["ep0"] == 0 || served["ep1"] == 0 || served["ep0"]+served["ep1"] != total {
		t.Errorf("served %v: want both endpoints, %d in all", served, total)
	}
	hits := c.ServiceHits(t)
	t.Logf("app connections served %v; TCP connections through the VIP per endpoint %v", served, hits)
	if hits[0] == 0 || hits[1] == 0 || hits[0]+hits[1] > 20 {
		t.Errorf("TCP connections through the VIP per endpoint %v: want both, and few (pooled) for %d app connections", hits, total)
	}
	_, body, err := c.Client.HTTPGet("127.0.0.1:15020", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if n := metric(body, "meshproxy_connections_total", `direction="outbound"`, `mode="hbone"`, `decision="allow"`); n != total {
		t.Errorf("client: %d outbound app connections carried as HBONE streams, want %d", n, total)
	}
	if n := metric(body, "meshproxy_connections_total", `direction="outbound"`, `mode="mtls"`, `decision="allow"`); n != 0 {
		t.Errorf("client: %d outbound app connections per-connection mTLS, want 0", n)
	}
	for i, ep := range c.Endpoints {
		_, body, err := ep.HTTPGet("127.0.0.1:15020", "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		if n := metric(body, "meshproxy_connections_total", `direction="inbound"`, `mode="hbone"`, `decision="allow"`); n != served[fmt.Sprintf("ep%d", i)] {
			t.Errorf("endpoint %d: %d inbound HBONE streams allowed, want %d", i, n, served[fmt.Sprintf("ep%d", i)])
		}
	}

	// A held app connection is listed as an HBONE stream by the client's
	// sidecar (by the app's address) and by the endpoint that serves it
	// (with the client's identity).
	held, release := holdApp(t, c.Client, vip4)
	defer release()
	deadline := time.Now().Add(30 * time.Second)
	for {
		client := peers(t, c.Client)
		var server []peer
		for _, ep := range c.Endpoints {
			server = append(server, peers(t, ep)...)
		}
		okClient := slices.ContainsFunc(client, func(p peer) bool { return p.Source == held && p.Mode == "hbone" })
		okServer := slices.ContainsFunc(server, func(p peer) bool {
			return p.Direction == "inbound" && p.Mode == "hbone" && p.PeerSPIFFEID == clientID
		})
		if okClient && okServer {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("held connection from %s not listed as hbone (client %v, server %v): client peers %+v, endpoint peers %+v",
				held, okClient, okServer, client, server)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type peer struct {
	Direction    string `json:"direction"`
	Source       string `json:"source"`
	Mode         string `json:"mode"`
	PeerSPIFFEID string `json:"peer_spiffe_id"`
}

// peers is `meshproxy peers -o json` in the pod.
func peers(t *testing.T, pod *netns.Pod) []peer {
	t.Helper()
	out, err := pod.Command(t, netns.As{}, bin, "peers", "--admin", "127.0.0.1:15000", "-o", "json").Output()
	if err != nil {
		t.Fatalf("peers in %s: %v\n%s", pod.Name, err, out)
	}
	var ps []peer
	if err := json.Unmarshal(out, &ps); err != nil {
		t.Fatalf("peers in %s: %v\n%s", pod.Name, err, out)
	}
	return ps
}

// dialFrom connects from the pod (as root: captured) to addr.
func dialFrom(pod *netns.Pod, addr string) (net.Conn, error) {
	var c net.Conn
	err := pod.Do(func() (err error) {
		// The socket is created here, on the namespaced thread.
		c, err = net.DialTimeout("tcp", addr, 30*time.Second)
		return err
	})
	return c, err
}

// dialApp connects from the pod to addr, sends a line and returns the line
// answered.
func dialApp(pod *netns.Pod, addr, msg string) (string, error) {
	c, err := dialFrom(pod, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// holdApp opens a captured connection to addr from the pod that the echo
// app has not answered yet, and returns its local address.
func holdApp(t *testing.T, pod *netns.Pod, addr string) (string, func()) {
	t.Helper()
	c, err := dialFrom(pod, addr)
	if err != nil {
		t.Fatal(err)
	}
	return netip.MustParseAddrPort(c.LocalAddr().String()).String(), func() { c.Close() }
}

// metric returns the value of the Prometheus text series name with all of
// labels, or -1.
func metric(body, name string, labels ...string) int {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\{([^}]*)\} (\S+)$`)
	for _, m := range re.FindAllStringSubmatch(body, -1) {
		all := true
		for _, l := range labels {
			all = all && strings.Contains(m[1], l)
		}
		if all {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return -1
			}
			return int(v)
		}
	}
	if len(labels) > 0 {
		return 0
	}
	return -1
}
