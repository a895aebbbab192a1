package demo

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Identities the demo's two workloads receive.
const (
	TrustDomain = "cluster.local"
	ClientID    = "spiffe://cluster.local/ns/demo/sa/client"
	EchoID      = "spiffe://cluster.local/ns/demo/sa/echo"
)

// Demo is one run of the demo.
type Demo struct {
	exe   string    // the meshproxy binary
	out   io.Writer // narration
	dir   string    // scratch directory
	keep  bool      // keep dir and print its path
	procs []*proc
	step  int
}

// Option configures a Demo.
type Option func(*Demo)

// WithKeepDir keeps the scratch directory (CA files, tokens, logs) after the run.
func WithKeepDir() Option { return func(d *Demo) { d.keep = true } }

// Run executes the demo with the meshproxy binary exe, narrating to out.
func Run(ctx context.Context, exe string, out io.Writer, opts ...Option) (err error) {
	d := &Demo{exe: exe, out: out}
	for _, o := range opts {
		o(d)
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if d.dir, err = os.MkdirTemp("", "meshproxy-demo-"); err != nil {
		return fmt.Errorf("demo: scratch dir: %w", err)
	}
	defer func() {
		d.stopAll()
		if err != nil {
			d.showLogs()
		}
		if d.keep {
			fmt.Fprintf(d.out, "\nFiles and logs kept in %s\n", d.dir)
		} else {
			os.RemoveAll(d.dir)
		}
	}()
	return d.run(ctx)
}

func (d *Demo) run(ctx context.Context) error {
	start := time.Now()
	d.say("meshproxy demo: a CA, two sidecars and an echo app, all on loopback.\n")
	d.say("Every process below is a real `meshproxy` process; the commands are the ones you would type.\n")

	// 1. The CA.
	d.section("Create a certificate authority (root + intermediate, Istio's cacerts layout)")
	caDir := filepath.Join(d.dir, "cacerts")
	if err := d.command(ctx, "ca", "init", "--dir", caDir, "--trust-domain", TrustDomain); err != nil {
		return err
	}
	d.say("  root-cert.pem is the trust bundle; ca-key.pem (mode 0600) signs workload certificates.\n")

	ports, err := freePorts(11)
	if err != nil {
		return err
	}
	caAddr := addr(ports[0])
	tokens := filepath.Join(d.dir, "tokens")
	clientTok, echoTok := filepath.Join(d.dir, "client.token"), filepath.Join(d.dir, "echo.token")
	if err := writeFiles(map[string]string{
		tokens:    "# TOKEN SPIFFE-ID\nclient-secret " + ClientID + "\necho-secret " + EchoID + "\n",
		clientTok: "client-secret\n",
		echoTok:   "echo-secret\n",
	}); err != nil {
		return err
	}
	d.section("Start the CA; callers prove who they are with bootstrap tokens")
	d.say("  tokens file: client-secret → %s\n               echo-secret   → %s\n", ClientID, EchoID)
	if _, err := d.start(ctx, "ca", "ca", "serve", "--dir", caDir, "--listen", caAddr, "--auth", "token",
		"--tokens", tokens, "--metrics", addr(ports[1])); err != nil {
		return err
	}
	if err := waitTCP(ctx, caAddr); err != nil {
		return fmt.Errorf("CA did not start listening on %s: %w", caAddr, err)
	}

	// 2. The app and the sidecars.
	app, err := startEcho()
	if err != nil {
		return err
	}
	defer app.Close()
	echoIn, clientOut := addr(ports[2]), addr(ports[3])
	echoAdmin, echoHealth := addr(ports[4]), addr(ports[5])
	clientAdmin, clientHealth := addr(ports[6]), addr(ports[7])
	policyDir := filepath.Join(d.dir, "echo-policy")
	if err := os.MkdirAll(policyDir, 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	d.section("Start the echo app and its sidecar (STRICT: only mesh mTLS gets in)")
	d.say("  echo app listens on %s (plain TCP, knows nothing about TLS)\n", app.Addr())
	caRoot := filepath.Join(caDir, "root-cert.pem")
	if _, err := d.start(ctx, "echo-sidecar", "run", "--ca-addr", caAddr, "--ca-root", caRoot, "--token-file", echoTok,
		"--inbound-explicit", echoIn+"="+app.Addr().String(), "--mode", "STRICT", "--namespace", "demo",
		"--config-dir", policyDir, "--admin", echoAdmin, "--health", echoHealth, "--metrics", addr(ports[8])); err != nil {
		return err
	}
	d.section("Start the client's sidecar: plaintext in, mesh mTLS out to the echo sidecar")
	if _, err := d.start(ctx, "client-sidecar", "run", "--ca-addr", caAddr, "--ca-root", caRoot, "--token-file", clientTok,
		"--outbound-explicit", clientOut+"="+echoIn+"#"+EchoID, "--namespace", "demo",
		"--admin", clientAdmin, "--health", clientHealth, "--metrics", addr(ports[9])); err != nil {
		return err
	}
	for _, h := range []struct{ name, addr string }{{"echo sidecar", echoHealth}, {"client sidecar", clientHealth}} {
		if err := waitReady(ctx, h.addr); err != nil {
			return fmt.Errorf("%s not ready: %w", h.name, err)
		}
	}
	d.say("  both sidecars generated a key in memory, sent a CSR with their token, and are ready.\n")
	echoIdent, err := identity(ctx, echoAdmin)
	if err != nil {
		return err
	}
	clientIdent, err := identity(ctx, clientAdmin)
	if err != nil {
		return err
	}
	d.say("  client sidecar: %s  serial %s  expires %s\n", clientIdent.SPIFFEID, short(clientIdent.Serial), clientIdent.NotAfter.Format(time.RFC3339))
	d.say("  echo sidecar:   %s  serial %s  expires %s\n", echoIdent.SPIFFEID, short(echoIdent.Serial), echoIdent.NotAfter.Format(time.RFC3339))
	if clientIdent.SPIFFEID != ClientID || echoIdent.SPIFFEID != EchoID {
		return fmt.Errorf("demo: unexpected identities %s / %s", clientIdent.SPIFFEID, echoIdent.SPIFFEID)
	}

	// 3. Traffic.
	d.section("Send a message: app client → client sidecar → mTLS → echo sidecar → echo app")
	conn, err := net.DialTimeout("tcp", clientOut, 5*time.Second)
	if err != nil {
		return fmt.Errorf("demo: dial client sidecar %s: %w", clientOut, err)
	}
	defer conn.Close()
	kept := bufio.NewReader(conn)
	reply, err := roundTrip(conn, kept, "hello mesh")
	if err != nil {
		return fmt.Errorf("demo: through the mesh: %w", err)
	}
	d.say("  sent %q to %s, got back %q\n", "hello mesh", clientOut, reply)
	peers, err := peerIDs(ctx, echoAdmin)
	if err != nil {
		return err
	}
	d.say("  the echo sidecar's /peers shows the caller as %s\n", strings.Join(peers, ", "))
	if !slices.Contains(peers, ClientID) {
		return fmt.Errorf("demo: echo sidecar does not list %s among its peers (%v)", ClientID, peers)
	}

	// 4. STRICT vs PERMISSIVE.
	d.section("STRICT refuses a client that does not speak mesh mTLS")
	if r, err := plaintext(echoIn); err == nil {
		return fmt.Errorf("demo: STRICT let a plaintext client through (reply %q)", r)
	} else {
		d.say("  plaintext client → %s: refused (%v)\n", echoIn, err)
	}
	d.section("Switch the echo workload to PERMISSIVE with an Istio PeerAuthentication file")
	pa := "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: demo\nspec:\n  mtls:\n    mode: PERMISSIVE\n"
	if err := os.WriteFile(filepath.Join(policyDir, "peerauthentication.yaml"), []byte(pa), 0o644); err != nil {
		return fmt.Errorf("demo: write policy: %w", err)
	}
	d.say("%s", indent(pa, "    "))
	if err := waitMode(ctx, echoAdmin, "PERMISSIVE"); err != nil {
		return err
	}
	d.say("  the sidecar picked the file up without a restart.\n")
	r, err := plaintext(echoIn)
	if err != nil {
		return fmt.Errorf("demo: PERMISSIVE refused a plaintext client: %w", err)
	}
	d.say("  plaintext client → %s: accepted, got back %q\n", echoIn, r)

	// 5. Rotation.
	d.section("Force a certificate rotation on both sidecars while a connection stays open")
	newEcho, err := rotate(ctx, echoAdmin)
	if err != nil {
		return err
	}
	newClient, err := rotate(ctx, clientAdmin)
	if err != nil {
		return err
	}
	d.say("  echo sidecar serial:   %s → %s\n", short(echoIdent.Serial), short(newEcho.Serial))
	d.say("  client sidecar serial: %s → %s\n", short(clientIdent.Serial), short(newClient.Serial))
	if newEcho.Serial == echoIdent.Serial || newClient.Serial == clientIdent.Serial {
		return errors.New("demo: rotation did not change the serial")
	}
	if reply, err = roundTrip(conn, kept, "still here"); err != nil {
		return fmt.Errorf("demo: open connection after rotation: %w", err)
	}
	d.say("  the connection opened before the rotation still works: %q\n", reply)
	c2, err := net.DialTimeout("tcp", clientOut, 5*time.Second)
	if err != nil {
		return fmt.Errorf("demo: dial after rotation: %w", err)
	}
	defer c2.Close()
	if reply, err = roundTrip(c2, bufio.NewReader(c2), "new cert"); err != nil {
		return fmt.Errorf("demo: new connection after rotation: %w", err)
	}
	d.say("  a new connection uses the new certificates: %q\n", reply)

	d.say("\nDone in %.1fs. Try it yourself with the commands above; `meshproxy <command> --help` explains each flag.\n",
		time.Since(start).Seconds())
	return nil
}

func (d *Demo) say(format string, args ...any) { fmt.Fprintf(d.out, format, args...) }

func (d *Demo) section(title string) {
	d.step++
	fmt.Fprintf(d.out, "\n%d. %s\n", d.step, title)
}

func (d *Demo) show(args []string) {
	fmt.Fprintf(d.out, "  $ meshproxy %s\n", strings.Join(args, " "))
}

// command runs a meshproxy command to completion.
func (d *Demo) command(ctx context.Context, args ...string) error {
	d.show(args)
	cmd := exec.CommandContext(ctx, d.exe, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("meshproxy %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// start launches a long-running meshproxy process logging to a file.
func (d *Demo) start(ctx context.Context, name string, args ...string) (*proc, error) {
	d.show(args)
	logPath := filepath.Join(d.dir, name+".log")
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("demo: %w", err)
	}
	cmd := exec.Command(d.exe, args...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("demo: start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	d.procs = append(d.procs, p)
	select {
	case <-p.done:
		return nil, fmt.Errorf("demo: %s exited at once: %v\n%s", name, p.err, tail(logPath))
	case <-time.After(50 * time.Millisecond):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return p, nil
}

// stopAll sends SIGTERM to every process, then SIGKILL after a grace period.
func (d *Demo) stopAll() {
	for i := len(d.procs) - 1; i >= 0; i-- {
		p := d.procs[i]
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(3 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
}

func (d *Demo) showLogs() {
	for _, p := range d.procs {
		fmt.Fprintf(d.out, "\n--- %s log (last lines) ---\n%s", p.name, tail(p.log))
	}
}

func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error() + "\n"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return strings.Join(lines, "\n") + "\n"
}

// echoServer is the demo's app: it answers each line with "echo: <line>".
type echoServer struct{ net.Listener }

func startEcho() (*echoServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("demo: echo app: %w", err)
	}
	var wg sync.WaitGroup
	go func() {
		defer wg.Wait()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				sc := bufio.NewScanner(c)
				for sc.Scan() {
					if _, err := fmt.Fprintf(c, "echo: %s\n", sc.Text()); err != nil {
						return
					}
				}
			}()
		}
	}()
	return &echoServer{ln}, nil
}

func roundTrip(c net.Conn, r *bufio.Reader, msg string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(line, "\n"), nil
}

// plaintext sends one line without TLS and returns the reply.
func plaintext(target string) (string, error) {
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	reply, err := roundTrip(c, bufio.NewReader(c), "plain hello")
	if err != nil {
		if errors.Is(err, io.EOF) {
			return "", errors.New("connection closed by the sidecar")
		}
		return "", err
	}
	return reply, nil
}

func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("demo: pick a free port: %w", err)
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func addr(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

func writeFiles(files map[string]string) error {
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	return nil
}

func waitTCP(ctx context.Context, target string) error {
	return poll(ctx, func() error {
		c, err := net.DialTimeout("tcp", target, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

func waitReady(ctx context.Context, health string) error {
	return poll(ctx, func() error {
		body, code, err := httpDo(ctx, http.MethodGet, "http://"+health+"/healthz/ready")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("%d: %s", code, strings.TrimSpace(string(body)))
		}
		return nil
	})
}

// poll retries fn every 100 ms for at most 20 s.
func poll(ctx context.Context, fn func() error) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		err := fn()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

type identityDoc struct {
	SPIFFEID string    `json:"spiffe_id"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
}

func identity(ctx context.Context, admin string) (identityDoc, error) {
	var id identityDoc
	err := getJSON(ctx, http.MethodGet, admin, "/identity", &id)
	return id, err
}

func rotate(ctx context.Context, admin string) (identityDoc, error) {
	var id identityDoc
	err := getJSON(ctx, http.MethodPost, admin, "/rotate", &id)
	return id, err
}

func peerIDs(ctx context.Context, admin string) ([]string, error) {
	var peers []struct {
		PeerSPIFFEID string `json:"peer_spiffe_id"`
	}
	if err := getJSON(ctx, http.MethodGet, admin, "/peers", &peers); err != nil {
		return nil, err
	}
	var ids []string
	for _, p := range peers {
		if p.PeerSPIFFEID != "" {
			ids = append(ids, p.PeerSPIFFEID)
		}
	}
	return ids, nil
}

func waitMode(ctx context.Context, admin, mode string) error {
	return poll(ctx, func() error {
		var cfg struct {
			Mode string `json:"mode"`
		}
		if err := getJSON(ctx, http.MethodGet, admin, "/config", &cfg); err != nil {
			return err
		}
		if cfg.Mode != mode {
			return fmt.Errorf("mode is %s", cfg.Mode)
		}
		return nil
	})
}

func getJSON(ctx context.Context, method, admin, path string, v any) error {
	body, code, err := httpDo(ctx, method, "http://"+admin+path)
	if err != nil {
		return fmt.Errorf("admin %s%s: %w", admin, path, err)
	}
	if code != http.StatusOK {
		return fmt.Errorf("admin %s%s: status %d: %s", admin, path, code, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("admin %s%s: %w", admin, path, err)
	}
	return nil
}

func httpDo(ctx context.Context, method, url string) ([]byte, int, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return body, resp.StatusCode, err
}

func short(serial string) string {
	if len(serial) > 12 {
		return serial[:12] + "…"
	}
	return serial
}

func indent(s, prefix string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(prefix + l + "\n")
	}
	return b.String()
}
