// Package netns builds throwaway "pods" for tests: network namespaces joined
// by a veth pair, with addresses from 198.18.0.0/15 and fd00:198:18::/64 that
// exist only inside them, plus helper processes (servers and dialers) that
// run inside a namespace, optionally as another uid or in a cgroup.
//
// Helper processes are the test binary itself, re-executed under
// `ip netns exec`; every test package using them calls RunHelper from its
// TestMain.
package netns

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Addresses of the two pods of a Pair. Pod B also owns OtherV4/OtherV6,
// reached through A's veth, for "excluded CIDR" tests.
var (
	AV4     = netip.MustParseAddr("198.18.0.1")
	BV4     = netip.MustParseAddr("198.18.0.2")
	AV6     = netip.MustParseAddr("fd00:198:18::1")
	BV6     = netip.MustParseAddr("fd00:198:18::2")
	OtherV4 = netip.MustParseAddr("198.19.0.2")
	OtherV6 = netip.MustParseAddr("fd00:198:19::2")
)

// Pod is one network namespace.
type Pod struct {
	Name string // netns name (ip netns list)
	Veth string // its end of the veth pair
	V4   netip.Addr
	V6   netip.Addr
}

var seq atomic.Uint32

// RequireRoot skips the test unless it runs as root: namespaces, nftables
// and BPF need CAP_SYS_ADMIN and CAP_NET_ADMIN.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Fatalf("ip (iproute2) not found: %v", err)
	}
}

// Run runs a command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func uniqueName() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("mp%s%d", hex.EncodeToString(b), seq.Add(1)%100)
}

// NewPair creates pods A and B joined by a veth pair and removes them when
// the test ends. A routes OtherV4/OtherV6 to B.
func NewPair(t testing.TB) (a, b *Pod) {
	t.Helper()
	RequireRoot(t)
	base := uniqueName()
	a = &Pod{Name: base + "-a", Veth: base + "a", V4: AV4, V6: AV6}
	b = &Pod{Name: base + "-b", Veth: base + "b", V4: BV4, V6: BV6}
	for _, p := range []*Pod{a, b} {
		Run(t, "ip", "netns", "add", p.Name)
		name := p.Name
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	}
	Run(t, "ip", "link", "add", a.Veth, "netns", a.Name, "type", "veth", "peer", "name", b.Veth, "netns", b.Name)
	for _, p := range []*Pod{a, b} {
		Run(t, "ip", "-n", p.Name, "link", "set", "lo", "up")
		Run(t, "ip", "-n", p.Name, "link", "set", p.Veth, "up")
		Run(t, "ip", "-n", p.Name, "addr", "add", p.V4.String()+"/24", "dev", p.Veth)
		Run(t, "ip", "-n", p.Name, "addr", "add", p.V6.String()+"/64", "dev", p.Veth, "nodad")
	}
	Run(t, "ip", "-n", b.Name, "addr", "add", OtherV4.String()+"/24", "dev", b.Veth)
	Run(t, "ip", "-n", b.Name, "addr", "add", OtherV6.String()+"/64", "dev", b.Veth, "nodad")
	Run(t, "ip", "-n", a.Name, "route", "add", "198.19.0.0/24", "dev", a.Veth)
	Run(t, "ip", "-n", a.Name, "route", "add", "fd00:198:19::/64", "dev", a.Veth)
	return a, b
}

// Do runs f on an OS thread that has entered the pod's namespace. The
// thread is discarded afterwards, never returned to the Go scheduler.
// Goroutines that f starts do not run in the namespace.
func (p *Pod) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := vnetns.GetFromName(p.Name)
		if err != nil {
			errc <- fmt.Errorf("open netns %s: %w", p.Name, err)
			return
		}
		defer h.Close()
		if err := vnetns.Set(h); err != nil {
			errc <- fmt.Errorf("enter netns %s: %w", p.Name, err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// Exec runs a command inside the pod and returns its combined output.
func (p *Pod) Exec(name string, args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", p.Name, name}, args...)...).CombinedOutput()
	return string(out), err
}

// NewCgroup creates a cgroup v2 directory for one test and removes it at
// the end (after the processes in it have been stopped).
func NewCgroup(t testing.TB) string {
	t.Helper()
	root, err := Cgroup2Mount()
	if err != nil {
		t.Skipf("kernel has no cgroup v2 hierarchy mounted: %v", err)
	}
	dir := filepath.Join(root, "meshproxy-test-"+uniqueName())
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		// Processes may still be exiting; bounded retries.
		for i := 0; i < 100; i++ {
			if err := os.Remove(dir); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("cgroup %s could not be removed", dir)
	})
	return dir
}

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" {
				return fields[4], nil
			}
		}
	}
	return "", fmt.Errorf("no cgroup2 mount in /proc/self/mountinfo")
}

// cgroupFD opens a cgroup directory for CLONE_INTO_CGROUP.
func cgroupFD(t testing.TB, dir string) int {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open cgroup %s: %v", dir, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}
