package netns

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshproxy/meshproxy/redirect"
)

// Environment of a helper process.
const (
	envHelper      = "MESHPROXY_NETNS_HELPER" // serve | dial
	envName        = "MESHPROXY_NETNS_NAME"
	envRole        = "MESHPROXY_NETNS_ROLE" // app | proxy
	envAddr        = "MESHPROXY_NETNS_ADDR"
	envUID         = "MESHPROXY_NETNS_UID"
	envGID         = "MESHPROXY_NETNS_GID"
	envTransparent = "MESHPROXY_NETNS_TRANSPARENT"
	envEcho        = "MESHPROXY_NETNS_ECHO"       // server: read a line first, then answer with it
	envSend        = "MESHPROXY_NETNS_SEND"       // dialer: send this line first
	envNetwork     = "MESHPROXY_NETNS_NETWORK"    // dialer: tcp (default), tcp4 or tcp6
	envHold        = "MESHPROXY_NETNS_HOLD"       // dialer: keep the connection until stdin closes
	envNetns       = "MESHPROXY_NETNS_PATH"       // exec: network namespace to enter
	envShowPeer    = "MESHPROXY_NETNS_PEER"       // dialer: append " peer=<getpeername>"
	envServePeer   = "MESHPROXY_NETNS_SERVE_PEER" // server: append " peer=<client address>"
	envCaps        = "MESHPROXY_NETNS_CAPS"       // exec: capabilities kept (ambient) across the uid change
)

// Generous: several engineers compile and test on two shared cores.
const helperTimeout = 30 * time.Second

// RunHelper turns the test binary into a helper process when it was started
// as one, and exits; otherwise it returns. Call it first in TestMain.
func RunHelper() {
	kind := os.Getenv(envHelper)
	if kind == "" {
		return
	}
	var err error
	switch kind {
	case "serve":
		err = serve()
	case "dial":
		err = dial()
	case "exec":
		err = execArgs()
	default:
		err = fmt.Errorf("unknown helper %q", kind)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "helper:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// dropPrivileges switches to MESHPROXY_NETNS_UID/GID if set (all threads).
func dropPrivileges() error {
	if g := os.Getenv(envGID); g != "" {
		n, _ := strconv.Atoi(g)
		if err := syscall.Setgroups(nil); err != nil {
			return fmt.Errorf("setgroups: %w", err)
		}
		if err := syscall.Setgid(n); err != nil {
			return fmt.Errorf("setgid %d: %w", n, err)
		}
	}
	if u := os.Getenv(envUID); u != "" {
		n, _ := strconv.Atoi(u)
		if err := syscall.Setuid(n); err != nil {
			return fmt.Errorf("setuid %d: %w", n, err)
		}
	}
	return nil
}

// serve listens on every address in envAddr (comma-separated) and answers
// each connection with one line: an app says who it is, a proxy stand-in
// says what redirect.OriginalDst returned.
func serve() error {
	name, role := os.Getenv(envName), os.Getenv(envRole)
	ctx := context.Background()
	var lns []net.Listener
	for _, addr := range strings.Split(os.Getenv(envAddr), ",") {
		var ln net.Listener
		var err error
		if os.Getenv(envTransparent) != "" {
			ln, err = redirect.ListenTransparent(ctx, "tcp", addr)
		} else {
			ln, err = net.Listen("tcp", addr)
		}
		if err != nil {
			return err
		}
		lns = append(lns, ln)
	}
	if err := dropPrivileges(); err != nil {
		return err
	}
	fmt.Println("READY")
	for _, ln := range lns {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go answer(c, name, role, os.Getenv(envEcho) != "", os.Getenv(envServePeer) != "")
			}
		}()
	}
	// Until the parent closes our stdin (or dies).
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

func answer(c net.Conn, name, role string, echo, showPeer bool) {
	defer c.Close()
	var line, got string
	if echo {
		_ = c.SetReadDeadline(time.Now().Add(helperTimeout))
		l, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return
		}
		got = " echo=" + strings.TrimSpace(l)
	}
	if role == "proxy" {
		dst, err := redirect.OriginalDst(c)
		if err != nil {
			line = fmt.Sprintf("proxy %s error=%q", name, err)
		} else {
			line = fmt.Sprintf("proxy %s origdst=%s", name, dst)
		}
	} else {
		line = fmt.Sprintf("app %s local=%s", name, c.LocalAddr())
	}
	if showPeer {
		got += " peer=" + c.RemoteAddr().String()
	}
	_, _ = fmt.Fprintln(c, line+got)
}

// dial connects to envAddr, optionally sends a line, reads one line and
// prints it; with envHold it then keeps the connection open until its
// stdin closes.
func dial() error {
	if err := dropPrivileges(); err != nil {
		return err
	}
	network := os.Getenv(envNetwork)
	if network == "" {
		network = "tcp"
	}
	var c net.Conn
	var err error
	if network == "tcp6-mapped" {
		c, err = dialMapped(os.Getenv(envAddr))
	} else {
		c, err = net.DialTimeout(network, os.Getenv(envAddr), helperTimeout)
	}
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(helperTimeout))
	if s := os.Getenv(envSend); s != "" {
		if _, err := fmt.Fprintln(c, s); err != nil {
			return fmt.Errorf("send to %s: %w", os.Getenv(envAddr), err)
		}
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read from %s: %w", os.Getenv(envAddr), err)
	}
	if os.Getenv(envShowPeer) != "" {
		line = strings.TrimSpace(line) + " peer=" + c.RemoteAddr().String() + "\n"
	}
	fmt.Print(line)
	if os.Getenv(envHold) != "" {
		_ = c.SetDeadline(time.Time{})
		_, _ = io.Copy(io.Discard, os.Stdin)
	}
	return nil
}

// dialMapped connects an AF_INET6 socket to an IPv4-mapped address, which
// the net package would dial over IPv4 instead.
func dialMapped(addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "tcp6-mapped")
	defer f.Close()
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
		return nil, err
	}
	tv := unix.NsecToTimeval(helperTimeout.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv) // bounds connect
	if err := unix.Connect(fd, &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}); err != nil {
		return nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	return net.FileConn(f)
}

// execArgs drops privileges and replaces itself with the command after
// "--" on its command line.
func execArgs() error {
	args := os.Args
	for i, a := range args {
		if a == "--" {
			args = args[i+1:]
			break
		}
	}
	if len(args) == 0 || args[0] == os.Args[0] {
		return errors.New("exec helper: no command after --")
	}
	// Enter the namespace on this thread only and exec from it: the new
	// program keeps the thread's namespace, and, unlike `ip netns exec`,
	// the host's /sys (cgroup v2, bpffs) stays visible.
	runtime.LockOSThread()
	if path := os.Getenv(envNetns); path != "" {
		h, err := vnetns.GetFromPath(path)
		if err != nil {
			return fmt.Errorf("open netns %s: %w", path, err)
		}
		if err := vnetns.Set(h); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
	}
	caps, err := parseCaps(os.Getenv(envCaps))
	if err != nil {
		return err
	}
	if len(caps) > 0 {
		// This thread keeps its permitted set across the setuid below.
		if err := unix.Prctl(unix.PR_SET_KEEPCAPS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("prctl PR_SET_KEEPCAPS: %w", err)
		}
	}
	if err := dropPrivileges(); err != nil {
		return err
	}
	if err := raiseAmbient(caps); err != nil {
		return err
	}
	return syscall.Exec(args[0], args, os.Environ())
}

// parseCaps parses envCaps: comma-separated capability numbers.
func parseCaps(s string) ([]int, error) {
	var caps []int
	for _, f := range strings.Split(s, ",") {
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 || n > unix.CAP_LAST_CAP {
			return nil, fmt.Errorf("capability %q: want a number 0-%d", f, unix.CAP_LAST_CAP)
		}
		caps = append(caps, n)
	}
	return caps, nil
}

// raiseAmbient makes caps the calling thread's permitted, effective,
// inheritable and ambient capabilities, so a program it execs as a non-root
// user holds them, as a container's capabilities.add does. It must run on
// the locked thread that execs, after the uid change (which clears the
// ambient set).
func raiseAmbient(caps []int) error {
	if len(caps) == 0 {
		return nil
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	for _, c := range caps {
		bit := uint32(1) << (c % 32)
		data[c/32].Permitted |= bit
		data[c/32].Effective |= bit
		data[c/32].Inheritable |= bit
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fmt.Errorf("capset %v: %w", caps, err)
	}
	for _, c := range caps {
		if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_RAISE, uintptr(c), 0, 0); err != nil {
			return fmt.Errorf("raise ambient capability %d: %w", c, err)
		}
	}
	return nil
}

// As says who a helper process runs as and where.
type As struct {
	UID, GID uint32 // 0: root
	Cgroup   string // cgroup v2 directory to start in; "" for the test's own
	// Caps are capabilities (unix.CAP_NET_ADMIN, ...) a Command keeps as
	// ambient capabilities after switching to UID, as a sidecar with
	// securityContext.capabilities.add has them. Only Command honours it.
	Caps []int
}

func (p *Pod) helperCmd(t testing.TB, as As, env ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("find test binary: %v", err)
	}
	if len(as.Caps) > 0 {
		t.Fatalf("As.Caps is only honoured by Pod.Command")
	}
	cmd := exec.Command("ip", "netns", "exec", p.Name, self, "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	p.applyAs(t, cmd, as)
	return cmd
}

func (p *Pod) applyAs(t testing.TB, cmd *exec.Cmd, as As) {
	t.Helper()
	// A -race helper would otherwise sleep a second before exiting.
	cmd.Env = append(cmd.Env, "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	if as.UID != 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", envUID, as.UID))
	}
	if as.GID != 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", envGID, as.GID))
	}
	if len(as.Caps) > 0 {
		var nums []string
		for _, c := range as.Caps {
			nums = append(nums, strconv.Itoa(c))
		}
		cmd.Env = append(cmd.Env, envCaps+"="+strings.Join(nums, ","))
	}
	if as.Cgroup != "" {
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD(t, as.Cgroup)}
	}
}

// Server describes a helper server.
type Server struct {
	Name        string   // shows in its answers
	Proxy       bool     // answer with redirect.OriginalDst instead of "app"
	Addrs       []string // listen addresses, e.g. ":8080"
	Transparent bool     // listen with redirect.ListenTransparent
	Echo        bool     // wait for a line from the client and include it in the answer
	ShowPeer    bool     // append " peer=ADDR": the client address the server sees
	As          As
}

// Serve starts a helper server in the pod and waits until it listens. It is
// stopped when the test ends.
func (p *Pod) Serve(t testing.TB, s Server) {
	t.Helper()
	role := "app"
	if s.Proxy {
		role = "proxy"
	}
	env := []string{envHelper + "=serve", envName + "=" + s.Name, envRole + "=" + role,
		envAddr + "=" + strings.Join(s.Addrs, ",")}
	if s.Transparent {
		env = append(env, envTransparent+"=1")
	}
	if s.Echo {
		env = append(env, envEcho+"=1")
	}
	if s.ShowPeer {
		env = append(env, envServePeer+"=1")
	}
	cmd := p.helperCmd(t, s.As, env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start server %s: %v", s.Name, err)
	}
	done := make(chan error, 1)
	t.Cleanup(func() {
		stdin.Close()
		select {
		case <-done:
		case <-time.After(helperTimeout):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "READY" {
			err = fmt.Errorf("unexpected first line %q", line)
		}
		ready <- err
		done <- cmd.Wait()
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("server %s in %s did not start: %v\n%s", s.Name, p.Name, err, stderr.String())
		}
	case <-time.After(helperTimeout):
		t.Fatalf("server %s in %s not ready after %v", s.Name, p.Name, helperTimeout)
	}
}

// DialOpts refine a dial.
type DialOpts struct {
	Send    string // a line to send before reading
	Network string // tcp (default), tcp4, tcp6, or tcp6-mapped: an AF_INET6 socket to an IPv4-mapped address
	// ShowPeer appends " peer=ADDR" to the answer: the peer address the
	// dialer's socket reports (getpeername).
	ShowPeer bool
}

func (o DialOpts) env(addr string) []string {
	env := []string{envHelper + "=dial", envAddr + "=" + addr}
	if o.Send != "" {
		env = append(env, envSend+"="+o.Send)
	}
	if o.Network != "" {
		env = append(env, envNetwork+"="+o.Network)
	}
	if o.ShowPeer {
		env = append(env, envShowPeer+"=1")
	}
	return env
}

// Dial connects from the pod to addr as as, and returns the first line
// the other end sent (trimmed).
func (p *Pod) Dial(t testing.TB, addr string, as As, opts ...DialOpts) (string, error) {
	t.Helper()
	var o DialOpts
	if len(opts) > 0 {
		o = opts[0]
	}
	cmd := p.helperCmd(t, as, o.env(addr)...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("dial %s from %s: %s", addr, p.Name, strings.TrimSpace(stderr.String()))
		}
		return "", err
	}
	return strings.TrimSpace(stdout.String()), nil
}

// DialHold dials like Dial and keeps the connection open until the test
// ends or release is called; it returns the first line received.
func (p *Pod) DialHold(t testing.TB, addr string, as As, o DialOpts) (line string, release func()) {
	t.Helper()
	cmd := p.helperCmd(t, as, append(o.env(addr), envHold+"=1")...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start dialer: %v", err)
	}
	done := make(chan struct{})
	release = func() {
		select {
		case <-done:
			return
		default:
		}
		stdin.Close()
		waited := make(chan struct{})
		go func() { _ = cmd.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(helperTimeout):
			_ = cmd.Process.Kill()
			<-waited
		}
		close(done)
	}
	t.Cleanup(release)
	lc := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(stdout).ReadString('\n')
		lc <- strings.TrimSpace(l)
	}()
	select {
	case line = <-lc:
	case <-time.After(2 * helperTimeout):
		t.Fatalf("dialer to %s: no answer: %s", addr, stderr.String())
	}
	if line == "" {
		release()
		t.Fatalf("dialer to %s failed: %s", addr, stderr.String())
	}
	return line, release
}

// Command returns a command that runs name with args inside the pod as as
// (root: no privilege change), in as.Cgroup if set. The command sees the
// host's mounts (cgroup v2, bpffs).
func (p *Pod) Command(t testing.TB, as As, name string, args ...string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("find test binary: %v", err)
	}
	cmd := exec.Command(self, append([]string{"-test.run=^$", "--", name}, args...)...)
	cmd.Env = append(os.Environ(), envHelper+"=exec", envNetns+"=/var/run/netns/"+p.Name)
	p.applyAs(t, cmd, as)
	return cmd
}
