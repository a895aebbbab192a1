package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	clientID = "spiffe://cluster.local/ns/soak/sa/client"
	serverID = "spiffe://cluster.local/ns/soak/sa/server"
)

// proc is a child process whose output goes to a log file.
type proc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

func startProc(logPath string, argv ...string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", filepath.Base(argv[0]), err)
	}
	p := &proc{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int                { return p.cmd.Process.Pid }
func (p *proc) exited() <-chan struct{} { return p.done }

// stop sends SIGTERM and kills after 10s.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// logTail returns the last n lines of the process's log.
func (p *proc) logTail(n int) string {
	data, _ := os.ReadFile(p.log)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// rssKiB is VmRSS from /proc/PID/status.
func (p *proc) rssKiB() (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", p.pid())
}

// fds counts the open descriptors in /proc/PID/fd.
func (p *proc) fds() (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.pid()))
	return len(entries), err
}

// sidecar is one `meshproxy run` and its admin address.
type sidecar struct {
	name, admin, health string
	proc                *proc
}

// httpClient makes one connection per request so sampling holds no
// descriptor in the sidecar between samples.
var httpClient = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

func (s *sidecar) get(ctx context.Context, method, path string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, method, "http://"+s.admin+path, nil)
	if err != nil {
		return "", err
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return string(body), nil
}

func (s *sidecar) rotate(ctx context.Context) error {
	_, err := s.get(ctx, http.MethodPost, "/rotate")
	return err
}

func (s *sidecar) goroutines() (int, error) {
	body, err := s.get(context.Background(), http.MethodGet, "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(body, "\n")
	var n int
	_, err = fmt.Sscanf(first, "goroutine profile: total %d", &n)
	return n, err
}

func (s *sidecar) ready() error {
	resp, err := httpClient.Get("http://" + s.health + "/healthz/ready")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: not ready (%d)", s.name, resp.StatusCode)
	}
	return nil
}

// mesh is the CA, both sidecars and the echo app.
type mesh struct {
	caAddr, entry  string
	ca             *proc
	client, server *sidecar
	app            net.Listener
}

func (m *mesh) stop() {
	for _, p := range []*proc{m.clientProc(), m.serverProc(), m.ca} {
		if p != nil {
			p.stop()
		}
	}
	if m.app != nil {
		m.app.Close()
	}
}

func (m *mesh) clientProc() *proc {
	if m.client == nil {
		return nil
	}
	return m.client.proc
}

func (m *mesh) serverProc() *proc {
	if m.server == nil {
		return nil
	}
	return m.server.proc
}

// startMesh builds (or takes) the binary, initialises and serves a CA,
// starts the echo app and both sidecars, and waits until they are ready.
func startMesh(ctx context.Context, dir, bin string) (m *mesh, err error) {
	if bin == "" {
		bin = filepath.Join(dir, "meshproxy")
		build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/meshproxy/meshproxy/cmd/meshproxy")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return nil, fmt.Errorf("build meshproxy: %w", err)
		}
	}
	caDir := filepath.Join(dir, "ca")
	if out, err := exec.CommandContext(ctx, bin, "ca", "init", "--dir", caDir, "--trust-domain", "cluster.local").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ca init: %w: %s", err, out)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.WriteFile(tokens, []byte("soak-client "+clientID+"\nsoak-server "+serverID+"\n"), 0o600); err != nil {
		return nil, err
	}
	for name, tok := range map[string]string{"client": "soak-client", "server": "soak-server"} {
		if err := os.WriteFile(filepath.Join(dir, name+".token"), []byte(tok+"\n"), 0o600); err != nil {
			return nil, err
		}
	}
	addrs, err := freeAddrs(12)
	if err != nil {
		return nil, err
	}
	m = &mesh{caAddr: addrs[0], entry: addrs[1]}
	defer func() {
		if err != nil {
			m.stop()
		}
	}()
	m.ca, err = startProc(filepath.Join(dir, "ca.log"), bin, "ca", "serve", "--dir", caDir, "--listen", m.caAddr,
		"--auth", "token", "--tokens", tokens, "--metrics", addrs[2])
	if err != nil {
		return nil, err
	}
	if m.app, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	go serveEcho(m.app)

	inbound := addrs[3]
	start := func(name, id string, a []string, listener ...string) (*sidecar, error) {
		args := append([]string{bin, "run"}, listener...)
		args = append(args, "--ca-addr", m.caAddr, "--ca-root", filepath.Join(caDir, "root-cert.pem"),
			"--token-file", filepath.Join(dir, name+".token"), "--cert-ttl", "1h",
			"--admin", a[0], "--health", a[1], "--metrics", a[2], "--log-level", "warn")
		p, err := startProc(filepath.Join(dir, name+".log"), args...)
		if err != nil {
			return nil, err
		}
		return &sidecar{name: name, admin: a[0], health: a[1], proc: p}, nil
	}
	if m.server, err = start("server", serverID, addrs[4:7], "--mode", "STRICT", "--inbound-explicit", inbound+"="+m.app.Addr().String()); err != nil {
		return nil, err
	}
	if m.client, err = start("client", clientID, addrs[7:10], "--outbound-explicit", m.entry+"="+inbound+"#"+serverID); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Minute)
	for _, s := range []*sidecar{m.server, m.client} {
		for {
			err := s.ready()
			if err == nil {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return nil, fmt.Errorf("%v; log:\n%s", err, s.proc.logTail(20))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return m, nil
}

// freeAddrs returns n loopback addresses whose ports are free right now.
func freeAddrs(n int) ([]string, error) {
	var out []string
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	return out, nil
}

// serveEcho echoes every connection of ln until ln is closed.
func serveEcho(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // out of descriptors and the like
			continue
		}
		go func() {
			defer c.Close()
			_, _ = io.Copy(c, c)
		}()
	}
}
