package spireint

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
)

// TestSPIREMeshproxyRunMovesBytesWithSPIREIdentities runs two real
// `meshproxy run --workload-api` sidecars against a SPIRE agent: a client
// sidecar with an explicit outbound listener (plaintext in, mesh mTLS out,
// server ID pinned) and a server sidecar with an explicit inbound listener
// in STRICT mode in front of an echo app. The two sidecars are copies of
// one binary at different paths, told apart by unix:path selectors. Bytes
// must flow with SPIRE identities on both sides, before and across a SPIRE
// rotation of the server's SVID, and an established connection must
// survive it.
func TestSPIREMeshproxyRunMovesBytesWithSPIREIdentities(t *testing.T) {
	skipShort(t)
	bins := buildMeshproxy(t, "client", "server")
	spire := startSPIRE(t,
		entry{clientID, []string{pathSelector(t, bins["client"])}},
		entry{serverID, []string{pathSelector(t, bins["server"])}})

	// This test process has no entry here: the agent refuses it, and a
	// source says so in Ready.
	unknown := runSource(t, spire.addr())
	deadline := time.Now().Add(waitLimit)
	for unknown.Status().LastError == "" && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if err := unknown.Ready(); err == nil || !strings.Contains(err.Error(), "PermissionDenied") || !strings.Contains(err.Error(), spire.addr()) {
		t.Errorf("a workload without an entry: Ready() = %v, want it to say SPIRE denied an identity and name the agent", err)
	}

	echo := startEcho(t)
	inbound, outbound := freePort(t), freePort(t)
	server := startSidecar(t, spire, bins["server"], "server",
		"--inbound-explicit", fmt.Sprintf("127.0.0.1:%d=%s", inbound, echo),
		"--mode", "STRICT")
	client := startSidecar(t, spire, bins["client"], "client",
		"--outbound-explicit", fmt.Sprintf("127.0.0.1:%d=127.0.0.1:%d#%s", outbound, inbound, serverID))
	server.waitReady(t)
	client.waitReady(t)
	app := fmt.Sprintf("127.0.0.1:%d", outbound)

	// The sidecars hold the SPIRE identities of their entries.
	for _, tc := range []struct {
		s    *sidecar
		want string
	}{{server, serverID}, {client, clientID}} {
		id := tc.s.identity(t)
		if id.SPIFFEID != tc.want || id.Source != "workload-api" {
			t.Errorf("%s sidecar /identity = {spiffe_id %q, source %q}, want {%s, workload-api}", tc.s.name, id.SPIFFEID, id.Source, tc.want)
		}
	}

	// A long-lived connection through both sidecars; the server sidecar
	// sees the client sidecar's SPIFFE ID on it.
	long := dialApp(t, app)
	defer long.Close()
	long.echo(t, "hello through mesh mTLS")
	var peers []struct {
		Direction    string `json:"direction"`
		PeerSPIFFEID string `json:"peer_spiffe_id"`
		Mode         string `json:"mode"`
	}
	server.admin(t, "/peers", &peers)
	found := false
	for _, p := range peers {
		found = found || p.PeerSPIFFEID == clientID
	}
	if !found {
		t.Errorf("server sidecar /peers = %+v, want a connection from %s", peers, clientID)
	}

	// Fresh connections keep working while SPIRE re-issues the SVIDs.
	startSerial := server.identity(t).Serial
	deadline = time.Now().Add(3 * svidTTL)
	var (
		rounds, after int
		failures      []string
	)
	for i := 0; i < 10000 && time.Now().Before(deadline) && after < 10; i++ {
		msg := fmt.Sprintf("round %d", i)
		if err := roundTrip(app, msg); err != nil {
			failures = append(failures, fmt.Sprintf("%s at %s: %v", msg, time.Now().Format(time.StampMilli), err))
		}
		rounds++
		if server.identity(t).Serial != startSerial {
			after++
		}
		time.Sleep(50 * time.Millisecond) // pace: leave CPU to SPIRE and the sidecars
	}
	if server.identity(t).Serial == startSerial {
		t.Fatalf("the server sidecar's serial stayed %s for %s: no SPIRE rotation reached it\n%s\n%s",
			startSerial, 3*svidTTL, server.logTail(), spire.logs())
	}
	if len(failures) > 0 {
		t.Errorf("%d of %d round trips across the rotation failed:\n%s\n%s\n%s",
			len(failures), rounds, strings.Join(failures, "\n"), client.logTail(), server.logTail())
	}
	long.echo(t, "still here after the rotation")
	t.Logf("%d round trips through both sidecars, %d after SPIRE rotated the server's SVID", rounds, after)
}

// buildMeshproxy builds ./cmd/meshproxy (or takes the binary named by
// $MESHPROXY_BIN) and copies it to one path per name: the unix attestor
// identifies each copy by its path. It fails the test, pointing at what is
// missing, if `meshproxy run` lacks the flags this test needs.
func buildMeshproxy(t *testing.T, names ...string) map[string]string {
	t.Helper()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	built := os.Getenv("MESHPROXY_BIN")
	if built == "" {
		root, err := filepath.Abs("../..")
		if err != nil {
			t.Fatal(err)
		}
		built = filepath.Join(dir, "meshproxy")
		build := e2eutil.BuildCommand(ctx, built)
		build.Dir = root
		out, err := build.CombinedOutput()
		if err != nil {
			t.Fatalf("go build ./cmd/meshproxy: %v\n%s", err, out)
		}
	}
	help, err := exec.CommandContext(ctx, built, "run", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("meshproxy run --help: %v\n%s", err, help)
	}
	for _, flag := range []string{"--workload-api", "--inbound-explicit", "--outbound-explicit", "--admin", "--health", "--metrics", "--mode"} {
		if !bytes.Contains(help, []byte(flag)) {
			t.Fatalf("`meshproxy run --help` has no %s flag: this test needs the real `meshproxy run` "+
				"(cmd/meshproxy/run.go, docs/CONTRACT.md \"Commands and flags\") with --workload-api wired to tlsmgr.NewWorkloadAPISource\n%s", flag, help)
		}
	}
	data, err := os.ReadFile(built)
	if err != nil {
		t.Fatal(err)
	}
	paths := map[string]string{}
	for _, name := range names {
		p := filepath.Join(dir, name, "meshproxy")
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o755); err != nil {
			t.Fatal(err)
		}
		paths[name] = p
	}
	return paths
}

// sidecar is a running `meshproxy run` process.
type sidecar struct {
	name                        string
	adminAddr, healthAddr, logF string
	exited                      chan struct{}
}

// startSidecar runs bin as `meshproxy run --workload-api` against spire's
// agent with free admin, metrics and health ports plus extra flags, and
// stops it (SIGTERM, then SIGKILL) when the test ends.
func startSidecar(t *testing.T, spire *deployment, bin, name string, extra ...string) *sidecar {
	t.Helper()
	s := &sidecar{
		name:       name,
		adminAddr:  fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		healthAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		logF:       filepath.Join(spire.dir, name+"-sidecar.log"),
		exited:     make(chan struct{}),
	}
	args := append([]string{"run",
		"--workload-api", spire.addr(),
		"--trust-domain", trustDomain,
		"--admin", s.adminAddr,
		"--health", s.healthAddr,
		"--metrics", fmt.Sprintf("127.0.0.1:%d", freePort(t)),
	}, extra...)
	logFile, err := os.Create(s.logF)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = e2eutil.EnvWithout("MESHPROXY_")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s sidecar: %v", name, err)
	}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(15 * time.Second):
			t.Errorf("%s sidecar did not stop within 15s of SIGTERM", name)
			_ = cmd.Process.Kill()
			<-s.exited
		}
		logFile.Close()
		if t.Failed() {
			t.Log(s.logTail())
		}
	})
	return s
}

func (s *sidecar) logTail() string {
	return fmt.Sprintf("--- %s sidecar log (tail):\n%s", s.name, tail(s.logF, 40))
}

// waitReady polls /healthz/ready until it answers 200 or waitLimit ends.
func (s *sidecar) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	client := &http.Client{Timeout: 5 * time.Second}
	last := "no answer"
	for attempt := 0; attempt < 1000 && time.Now().Before(deadline); attempt++ {
		select {
		case <-s.exited:
			t.Fatalf("%s sidecar exited before it was ready (this test needs `meshproxy run --workload-api` "+
				"wired to tlsmgr.NewWorkloadAPISource in cmd/meshproxy)\n%s", s.name, s.logTail())
		default:
		}
		resp, err := client.Get("http://" + s.healthAddr + "/healthz/ready")
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(body))
		} else {
			last = err.Error()
		}
		time.Sleep(250 * time.Millisecond)
	}
	t.Fatalf("%s sidecar not ready after %s: %s\n%s", s.name, waitLimit, last, s.logTail())
}

// adminIdentity is the part of GET /identity this test reads.
type adminIdentity struct {
	SPIFFEID string `json:"spiffe_id"`
	Serial   string `json:"serial"`
	Source   string `json:"source"`
}

func (s *sidecar) identity(t *testing.T) adminIdentity {
	t.Helper()
	var id adminIdentity
	s.admin(t, "/identity", &id)
	return id
}

// admin GETs path from the admin API and decodes its JSON into v.
func (s *sidecar) admin(t *testing.T, path string, v any) {
	t.Helper()
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get("http://" + s.adminAddr + path)
	if err != nil {
		t.Fatalf("%s sidecar admin %s: %v\n%s", s.name, path, err, s.logTail())
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s sidecar admin %s: %s: %s", s.name, path, resp.Status, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("%s sidecar admin %s: %v in %s", s.name, path, err, body)
	}
}

// startEcho runs an echo app on loopback and returns its address.
func startEcho(t *testing.T) string {
	t.Helper()
	return proxytest.StartApp(t, 5*time.Minute, func(c net.Conn) { _, _ = io.Copy(c, c) }).Addr()
}

// appConn is the app's plaintext connection to its sidecar.
type appConn struct {
	net.Conn
	r *bufio.Reader
}

func dialApp(t *testing.T, addr string) *appConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 30*time.Second)
	if err != nil {
		t.Fatalf("dial the client sidecar's outbound listener %s: %v", addr, err)
	}
	return &appConn{Conn: c, r: bufio.NewReader(c)}
}

func (c *appConn) echo(t *testing.T, msg string) {
	t.Helper()
	if err := c.echoErr(msg); err != nil {
		t.Fatalf("echo %q on the long-lived connection: %v", msg, err)
	}
}

func (c *appConn) echoErr(msg string) error {
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return err
	}
	got, err := c.r.ReadString('\n')
	if err != nil {
		return err
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo returned %q, want %q", got, msg+"\n")
	}
	return nil
}

// roundTrip sends msg on a fresh connection and checks the echo.
func roundTrip(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 30*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return (&appConn{Conn: c, r: bufio.NewReader(c)}).echoErr(msg)
}
