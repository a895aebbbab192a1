package netns_test

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// bin is the meshproxy binary built by TestMain.
var bin string

func TestMain(m *testing.M) {
	netns.RunHelper()
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	{
		dir, err := os.MkdirTemp("", "meshproxy-netns-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		// The sidecars run as uid 1337 and must reach the binary.
		if err := os.Chmod(dir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		bin = filepath.Join(dir, "meshproxy")
		if out, err := e2eutil.BuildCommand(context.Background(), bin).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build meshproxy: %v\n%s", err, out)
			return 1
		}
	}
	return m.Run()
}

const (
	appPort      = 8080 // echo app: the client speaks first
	firstPort    = 8081 // server-speaks-first app
	excludedPort = 9090 // excluded from B's inbound capture
	clientID     = "spiffe://cluster.local/ns/default/sa/client"
	serverID     = "spiffe://cluster.local/ns/default/sa/server"
	meshCIDRs    = "198.18.0.0/15,fd00:198::/32"
)

var proxyUser = netns.As{UID: redirect.DefaultProxyUID, GID: redirect.DefaultProxyGID}

func hp(a netip.Addr, port int) string { return netip.AddrPortFrom(a, uint16(port)).String() }

// syncBuffer collects a process's output from its copying goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// sidecar is a running `meshproxy run`.
type sidecar struct {
	pod  *netns.Pod
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan error
}

// identityFiles writes an SVID for id where uid 1337 can read it.
func identityFiles(t *testing.T, ca *testpki.CA, id string) []string {
	t.Helper()
	dir := t.TempDir()
	cert, key, bundle := ca.WriteSVID(t, dir, ca.Issue(t, id, time.Hour))
	for _, p := range []string{dir, cert, key, bundle} {
		if err := os.Chown(p, redirect.DefaultProxyUID, redirect.DefaultProxyGID); err != nil {
			t.Fatal(err)
		}
	}
	// t.TempDir's parent is 0700 for root; give the sidecar a path it can walk.
	for d := filepath.Dir(dir); d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return []string{"--cert-file", cert, "--key-file", key, "--bundle-file", bundle}
}

// startSidecar runs `meshproxy run` in the pod as the proxy user and waits
// until it is ready.
func startSidecar(t *testing.T, pod *netns.Pod, cgroup string, mode string, identity []string) *sidecar {
	t.Helper()
	as := proxyUser
	as.Cgroup = cgroup
	return startSidecarAs(t, pod, as, mode, identity)
}

// startSidecarAs is startSidecar as as, with extra flags.
func startSidecarAs(t *testing.T, pod *netns.Pod, as netns.As, mode string, identity []string, extra ...string) *sidecar {
	t.Helper()
	args := append([]string{"run"}, identity...)
	args = append(args, "--inbound", ":15006", "--outbound", ":15001",
		"--mode", mode, "--detect-timeout", "1s", "--drain-timeout", "1s",
		"--admin", "127.0.0.1:15000", "--metrics", ":15020", "--health", ":15021")
	if !slices.Contains(extra, "--mesh-cidrs") {
		args = append(args, "--mesh-cidrs", meshCIDRs)
	}
	args = append(args, extra...)
	s := &sidecar{pod: pod, cmd: pod.Command(t, as, bin, args...), out: &syncBuffer{}, done: make(chan error, 1)}
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start sidecar in %s: %v", pod.Name, err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		s.stop(t)
		if t.Failed() {
			t.Logf("sidecar in %s (%s) said:\n%s", pod.Name, mode, s.out.String())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		code, _, err := pod.HTTPGet("127.0.0.1:15021", "/healthz/ready")
		if err == nil && code == 200 {
			return s
		}
		select {
		case err := <-s.done:
			s.done <- err
			t.Fatalf("sidecar in %s exited: %v\n%s", pod.Name, err, s.out.String())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar in %s not ready after 60s (last: %d %v)\n%s", pod.Name, code, err, s.out.String())
		}
	}
}

func (s *sidecar) stop(t *testing.T) {
	select {
	case err := <-s.done:
		s.done <- err
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.done:
		s.done <- err
	case <-time.After(30 * time.Second):
		_ = s.cmd.Process.Kill()
		s.done <- <-s.done
		t.Errorf("sidecar in %s did not stop on SIGTERM", s.pod.Name)
	}
}

// meshproxy runs the binary in the pod as root and returns its output.
func meshproxy(t *testing.T, pod *netns.Pod, args ...string) (string, error) {
	t.Helper()
	out, err := pod.Command(t, netns.As{}, bin, args...).CombinedOutput()
	return string(out), err
}

// TestSidecarsThroughCapture runs two real sidecars behind each capture
// mechanism: a plain client in pod A reaches the app in pod B through both,
// the bytes between the pods are TLS, B sees A's SPIFFE ID, a client without
// a sidecar is refused under STRICT and served under PERMISSIVE (also when
// the server speaks first), excluded ports and CIDRs bypass the proxies,
// IPv6 works, and uninstall leaves nothing behind.
func TestSidecarsThroughCapture(t *testing.T) {
	eachMode(t, testSidecars)
}

// eachMode runs test as a subtest per capture mode (ebpf where the kernel
// has a cgroup v2 hierarchy).
func eachMode(t *testing.T, test func(*testing.T, redirect.Mode)) {
	netns.RequireRoot(t)
	for _, mode := range redirect.Modes {
		t.Run(string(mode), func(t *testing.T) {
			if mode == redirect.ModeEBPF {
				if _, err := netns.Cgroup2Mount(); err != nil {
					t.Skipf("kernel without a cgroup v2 hierarchy: %v", err)
				}
			}
			test(t, mode)
		})
	}
}

func testSidecars(t *testing.T, mode redirect.Mode) {
	a, b := netns.NewPair(t)
	var cgA, cgB string
	if mode == redirect.ModeEBPF {
		cgA, cgB = netns.NewCgroup(t), netns.NewCgroup(t)
	}
	ca := testpki.New(t, "cluster.local")
	idA, idB := identityFiles(t, ca, clientID), identityFiles(t, ca, serverID)

	b.Serve(t, netns.Server{Name: "b", Echo: true, Addrs: []string{fmt.Sprintf(":%d", appPort)}})
	b.Serve(t, netns.Server{Name: "b-first", Addrs: []string{fmt.Sprintf(":%d", firstPort)}})
	b.Serve(t, netns.Server{Name: "b-excluded", Addrs: []string{fmt.Sprintf(":%d", excludedPort)}})

	flags := func(cgroup string, extra ...string) []string {
		f := []string{"--mode", string(mode)}
		if cgroup != "" {
			f = append(f, "--cgroup", cgroup)
		}
		return append(f, extra...)
	}
	flagsA := flags(cgA, "--exclude-outbound-cidrs", "198.19.0.0/24,fd00:198:19::/64")
	flagsB := flags(cgB, "--exclude-inbound-ports", fmt.Sprint(excludedPort))
	for _, p := range []struct {
		pod   *netns.Pod
		flags []string
	}{{a, flagsA}, {b, flagsB}} {
		if out, err := meshproxy(t, p.pod, append([]string{"redirect", "install"}, p.flags...)...); err != nil {
			t.Fatalf("redirect install in %s: %v\n%s", p.pod.Name, err, out)
		}
		t.Cleanup(func() { _, _ = meshproxy(t, p.pod, append([]string{"redirect", "uninstall"}, p.flags...)...) })
	}
	out, err := meshproxy(t, a, append([]string{"redirect", "status"}, flagsA...)...)
	if err != nil || !strings.Contains(out, "installed") || strings.Contains(out, "missing") {
		t.Fatalf("redirect status in A: %v\n%s", err, out)
	}
	t.Logf("redirect status in pod A:\n%s", out)

	startSidecar(t, a, cgA, "STRICT", idA)
	sideB := startSidecar(t, b, cgB, "STRICT", idB)

	app := netns.As{UID: 1000, GID: 1000, Cgroup: cgA}
	// A's proxy user skips A's capture: this is traffic from a pod without a sidecar.
	noSidecar := netns.As{UID: proxyUser.UID, GID: proxyUser.GID, Cgroup: cgA}

	for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
		t.Run("mtls-"+dst.String(), func(t *testing.T) { assertMeshed(t, a, b, dst, app) })
	}

	t.Run("strict-refuses-pod-without-sidecar", func(t *testing.T) {
		for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
			line, err := a.Dial(t, hp(dst, appPort), noSidecar, netns.DialOpts{Send: "hello"})
			if err == nil && strings.HasPrefix(line, "app") {
				t.Errorf("STRICT served plaintext from a pod without sidecar: %q", line)
			}
		}
	})

	t.Run("excluded-port-and-cidr-bypass", func(t *testing.T) {
		for _, c := range []struct {
			dst netip.Addr
			as  netns.As
			why string
		}{
			{netns.BV4, noSidecar, "B's excluded inbound port"},
			{netns.BV6, noSidecar, "B's excluded inbound port"},
			// A's excluded CIDR: A's sidecar would send mTLS, which the
			// app on the excluded port could not read.
			{netns.OtherV4, app, "A's excluded CIDR and B's excluded port"},
			{netns.OtherV6, app, "A's excluded CIDR and B's excluded port"},
		} {
			to := hp(c.dst, excludedPort)
			line, err := a.Dial(t, to, c.as)
			if want := "app b-excluded local=" + to; err != nil || line != want {
				t.Errorf("%s (%s): got %q, %v; want %q", to, c.why, line, err, want)
			}
		}
	})

	// Same pods, B's sidecar now PERMISSIVE.
	sideB.stop(t)
	startSidecar(t, b, cgB, "PERMISSIVE", idB)

	t.Run("permissive", func(t *testing.T) {
		for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
			to := hp(dst, appPort)
			line, err := a.Dial(t, to, noSidecar, netns.DialOpts{Send: "plain"})
			if want := "app b local=" + to + " echo=plain"; err != nil || line != want {
				t.Errorf("PERMISSIVE plaintext from a pod without sidecar: got %q, %v; want %q", line, err, want)
			}
			first := hp(dst, firstPort)
			for _, as := range []netns.As{noSidecar, app} {
				line, err := a.Dial(t, first, as)
				if want := "app b-first local=" + first; err != nil || line != want {
					t.Errorf("server-speaks-first app as uid %d: got %q, %v; want %q", as.UID, line, err, want)
				}
			}
			line, err = a.Dial(t, to, app, netns.DialOpts{Send: "meshed"})
			if want := "app b local=" + to + " echo=meshed"; err != nil || line != want {
				t.Errorf("PERMISSIVE mesh mTLS: got %q, %v; want %q", line, err, want)
			}
		}
	})

	for _, p := range []struct {
		pod   *netns.Pod
		flags []string
		cg    string
	}{{a, flagsA, cgA}, {b, flagsB, cgB}} {
		if out, err := meshproxy(t, p.pod, append([]string{"redirect", "uninstall"}, p.flags...)...); err != nil {
			t.Fatalf("redirect uninstall in %s: %v\n%s", p.pod.Name, err, out)
		}
		netns.AssertNoCapture(t, p.pod, redirect.Config{Mode: mode, CgroupPath: p.cg})
	}
}

// assertMeshed holds a connection from a (as app) to b's echo app at dst
// through both sidecars, and checks the answer, that b's sidecar lists a's
// identity among its peers, and that only TLS crossed the wire.
func assertMeshed(t *testing.T, a, b *netns.Pod, dst netip.Addr, app netns.As) {
	t.Helper()
	marker := "PLAINTEXT-MARKER-" + strings.ReplaceAll(dst.String(), ":", "-")
	sniff := b.Sniff(t)
	line, release := a.DialHold(t, hp(dst, appPort), app, netns.DialOpts{Send: marker})
	if want := "app b local=" + hp(dst, appPort) + " echo=" + marker; line != want {
		t.Errorf("through both sidecars: got %q, want %q", line, want)
	}
	peers, err := meshproxy(t, b, "peers", "--admin", "127.0.0.1:15000", "-o", "json")
	if err != nil || !strings.Contains(peers, clientID) {
		t.Errorf("B's peers do not show A's identity %s (err %v):\n%s", clientID, err, peers)
	}
	release()
	assertTLSOnWire(t, sniff.Stop(), appPort, marker)
}

// assertTLSOnWire checks that the client's bytes to port went over the
// wire as TLS records and that the plaintext marker never did.
func assertTLSOnWire(t *testing.T, segs []netns.Segment, port uint16, marker string) {
	t.Helper()
	var toApp [][]byte
	firstOfFlow := map[uint16][]byte{} // by client port
	var flows []uint16
	for _, s := range segs {
		if bytes.Contains(s.Payload, []byte(marker)) {
			t.Errorf("plaintext marker %q seen on the wire (port %d → %d)", marker, s.SrcPort, s.DstPort)
		}
		if s.DstPort == port {
			toApp = append(toApp, s.Payload)
			if _, ok := firstOfFlow[s.SrcPort]; !ok {
				firstOfFlow[s.SrcPort] = s.Payload
				flows = append(flows, s.SrcPort)
			}
		}
	}
	if len(toApp) == 0 {
		t.Fatalf("no payload to port %d captured (%d segments in all)", port, len(segs))
	}
	// The connection made for this dial starts with a TLS handshake record
	// (ClientHello), unless the dial rode a pooled mesh connection an
	// earlier dial made (captured connections pool under --hbone=auto):
	// then what this window saw of every connection starts with a TLS
	// application-data record.
	hello, pooled := false, true
	for _, f := range flows {
		first := firstOfFlow[f]
		hello = hello || len(first) >= 6 && first[0] == 0x16 && first[1] == 0x03 && first[5] == 0x01
		pooled = pooled && len(first) >= 5 && first[0] == 0x17 && first[1] == 0x03 && first[2] == 0x03
	}
	if !hello && !pooled {
		first := toApp[0]
		t.Errorf("no connection to port %d starts with a TLS ClientHello or rides a pooled TLS connection; first bytes: % x", port, first[:min(len(first), 16)])
	}
	sawAppData := false
	for _, p := range toApp {
		if len(p) >= 3 && p[0] == 0x17 && p[1] == 0x03 && p[2] == 0x03 {
			sawAppData = true
		}
	}
	if !sawAppData {
		t.Errorf("no TLS application-data record to port %d", port)
	}
}
