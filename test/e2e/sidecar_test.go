package e2e

import (
	"bufio"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

const (
	clientID = "spiffe://cluster.local/ns/demo/sa/client"
	serverID = "spiffe://cluster.local/ns/demo/sa/server"
)

func TestDemoRunsAndExplains(t *testing.T) {
	r := runCmd(t, nil, "demo")
	if r.code != 0 {
		t.Fatalf("meshproxy demo exited %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{
		"spiffe://cluster.local/ns/demo/sa/client",
		"spiffe://cluster.local/ns/demo/sa/echo",
		`got back "echo: hello mesh"`,
		"refused",
		"accepted",
		"still works",
		"Done in",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("demo output lacks %q:\n%s", want, r.stdout)
		}
	}
}

func TestUsageErrorsExit2AndNameTheFlag(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	ident := fileIdentity(t, pki, serverID)
	tests := []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"unknown flag", nil, []string{"run", "--bogus"}, "--bogus"},
		{"no listener", nil, append([]string{"run"}, ident...), "no listener"},
		{"bad mode", nil, append([]string{"run", "--mode", "LOOSE", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}, ident...), "--mode"},
		{"admin not loopback", nil, append([]string{"run", "--admin", "0.0.0.0:15000", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}, ident...), "--admin"},
		{"bad explicit inbound", nil, append([]string{"run", "--inbound-explicit", "8443"}, ident...), "--inbound-explicit"},
		{"bad outbound id", nil, append([]string{"run", "--outbound-explicit", "127.0.0.1:0=127.0.0.1:1#http://x"}, ident...), "--outbound-explicit"},
		{"bad mesh cidr", nil, append([]string{"run", "--mesh-cidrs", "10.0.0.0/33", "--outbound", "127.0.0.1:0"}, ident...), "--mesh-cidrs"},
		{"two identity sources", nil, []string{"run", "--cert-file", "a", "--key-file", "b", "--bundle-file", "c", "--workload-api", "unix:///x", "--outbound", "127.0.0.1:0"}, "exactly one identity source"},
		{"env value invalid", []string{"MESHPROXY_DETECT_TIMEOUT=soon"}, append([]string{"run", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}, ident...), "MESHPROXY_DETECT_TIMEOUT"},
		{"identity output", nil, []string{"identity", "-o", "yaml"}, "--output"},
		{"inspect without bundle", nil, []string{"inspect", "127.0.0.1:1"}, "--bundle"},
		{"inspect extra args", nil, []string{"inspect", "a:1", "b:2", "--bundle", "x"}, "accepts 1 arg"},
		{"bad rotate interval", nil, append([]string{"run", "--rotate-interval", "0s", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}, ident...), "--rotate-interval"},
		{"negative max connections", nil, append([]string{"run", "--max-connections", "-1", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}, ident...), "--max-connections"},
		{"unknown command", nil, []string{"nosuchcommand"}, `unknown command "nosuchcommand"`},
		{"unknown ca subcommand", nil, []string{"ca", "nosuchcommand"}, `unknown command "nosuchcommand" for "meshproxy ca"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := runCmd(t, tc.env, tc.args...)
			if r.code != 2 {
				t.Fatalf("exit %d, want 2; stderr: %s", r.code, r.stderr)
			}
			if !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("stderr does not name %q: %s", tc.want, r.stderr)
			}
		})
	}
}

func TestEnvironmentSetsFlags(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	app := echoApp(t)
	in := freeAddr(t)
	a := newSidecarAddrs(t)
	// The admin, health and metrics addresses and the mode come only from the environment.
	startEnv(t, []string{"MESHPROXY_ADMIN=" + a.admin, "MESHPROXY_HEALTH=" + a.health, "MESHPROXY_METRICS=" + a.metrics, "MESHPROXY_MODE=STRICT"},
		append([]string{"run", "--inbound-explicit", in + "=" + app}, fileIdentity(t, pki, serverID)...)...)
	a.waitReady(t)
	code, body, err := httpGet("http://" + a.admin + "/config")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /config: %d %v", code, err)
	}
	var cfg struct{ Mode string }
	if err := json.Unmarshal([]byte(body), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Mode != "STRICT" {
		t.Fatalf("MESHPROXY_MODE=STRICT not applied: mode %q", cfg.Mode)
	}
}

func TestBadIdentityFilesNameTheFile(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	cert, key, bundle := pki.WriteSVID(t, dir, pki.Issue(t, serverID, time.Hour))
	otherDir := t.TempDir()
	_, otherKey, _ := pki.WriteSVID(t, otherDir, pki.Issue(t, serverID, time.Hour))
	missing := filepath.Join(dir, "nope.pem")
	tests := []struct {
		name            string
		cert, key, bndl string
		want            string
	}{
		{"missing cert", missing, key, bundle, missing},
		{"missing key", cert, missing, bundle, missing},
		{"missing bundle", cert, key, missing, missing},
		{"key of another cert", cert, otherKey, bundle, otherKey},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := runCmd(t, nil, "run", "--cert-file", tc.cert, "--key-file", tc.key, "--bundle-file", tc.bndl,
				"--inbound-explicit", freeAddr(t)+"=127.0.0.1:1", "--admin", "off", "--health", "off", "--metrics", "off")
			if r.code != 1 {
				t.Fatalf("exit %d, want 1; stderr: %s", r.code, r.stderr)
			}
			if !strings.Contains(r.stderr, tc.want) {
				t.Fatalf("error does not name %s: %s", tc.want, r.stderr)
			}
		})
	}
}

func TestMalformedPolicyNamesFileAndLine(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	bad := filepath.Join(dir, "peer.yaml")
	if err := os.WriteFile(bad, []byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\n  namespace: default\nspec:\n  mtls:\n    mode: [STRICT\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// --strict-config: refuses to start, naming the file and line.
	r := runCmd(t, nil, append([]string{"run", "--config-dir", dir, "--strict-config",
		"--inbound-explicit", freeAddr(t) + "=127.0.0.1:1", "--admin", "off", "--health", "off", "--metrics", "off"}, fileIdentity(t, pki, serverID)...)...)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1; stderr: %s", r.code, r.stderr)
	}
	if !strings.Contains(r.stderr, "peer.yaml") || !strings.Contains(r.stderr, "line") {
		t.Fatalf("error does not name the file and line: %s", r.stderr)
	}
	// By default: starts, and GET /config lists the rejection with its file
	// and line.
	a := newSidecarAddrs(t)
	start(t, append(append([]string{"run", "--config-dir", dir, "--inbound-explicit", freeAddr(t) + "=127.0.0.1:1"}, a.flags()...), fileIdentity(t, pki, serverID)...)...)
	a.waitReady(t)
	code, body, err := httpGet("http://" + a.admin + "/config")
	compact := strings.ReplaceAll(body, " ", "")
	if err != nil || code != http.StatusOK || !strings.Contains(compact, `"result":"rejected"`) || !strings.Contains(compact, "peer.yaml:document1") ||
		!strings.Contains(compact, "line8") {
		t.Fatalf("GET /config: %d %v %s", code, err, body)
	}
}

func TestUnreachableCAKeepsSidecarUnreadyThenRecovers(t *testing.T) {
	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if r := runCmd(t, nil, "ca", "init", "--dir", caDir, "--trust-domain", "cluster.local"); r.code != 0 {
		t.Fatalf("ca init: %d %s", r.code, r.stderr)
	}
	tokens := filepath.Join(dir, "tokens")
	token := filepath.Join(dir, "token")
	writeFile(t, tokens, "s3cret "+serverID+"\n")
	writeFile(t, token, "s3cret\n")
	caAddr := freeAddr(t) // nothing listens here yet
	a := newSidecarAddrs(t)
	side := start(t, append([]string{"run", "--ca-addr", caAddr, "--ca-root", filepath.Join(caDir, "root-cert.pem"),
		"--token-file", token, "--inbound-explicit", freeAddr(t) + "=" + echoApp(t)}, a.flags()...)...)

	// Unready, and it says why.
	eventually(t, "health answers 503 naming the CA", func() error {
		code, body, err := httpGet("http://" + a.health + "/healthz/ready")
		if err != nil {
			return err
		}
		if code != http.StatusServiceUnavailable {
			return fmt.Errorf("status %d, want 503", code)
		}
		if !strings.Contains(strings.ToLower(body), "connect") && !strings.Contains(strings.ToLower(body), "unavailable") {
			return fmt.Errorf("reason does not say the CA is unreachable: %q", body)
		}
		return nil
	})
	select {
	case <-side.done:
		t.Fatalf("sidecar exited while the CA was down: %v", side.Err())
	default:
	}
	// The CA comes up; the sidecar retries and becomes ready.
	start(t, "ca", "serve", "--dir", caDir, "--listen", caAddr, "--auth", "token", "--tokens", tokens, "--metrics", freeAddr(t))
	a.waitReady(t)
}

func TestSIGTERMDrainLetsTransferFinish(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	// A sink app that reads slowly and answers with the sha256 of what it read.
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				h := sha256.New()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					h.Write(buf[:n])
					if err != nil {
						break
					}
					time.Sleep(2 * time.Millisecond)
				}
				fmt.Fprintf(c, "%x\n", h.Sum(nil))
			}()
		}
	}()
	in, out := freeAddr(t), freeAddr(t)
	sa, ca := newSidecarAddrs(t), newSidecarAddrs(t)
	server := start(t, append(append([]string{"run", "--mode", "STRICT", "--drain-timeout", "30s",
		"--inbound-explicit", in + "=" + sink.Addr().String()}, fileIdentity(t, pki, serverID)...), sa.flags()...)...)
	start(t, append(append([]string{"run", "--outbound-explicit", out + "=" + in + "#" + serverID}, fileIdentity(t, pki, clientID)...), ca.flags()...)...)
	sa.waitReady(t)
	ca.waitReady(t)

	conn, err := net.DialTimeout("tcp", out, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	payload := make([]byte, 16<<20)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%x", sha256.Sum256(payload))
	sent := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		if err == nil {
			err = conn.(*net.TCPConn).CloseWrite()
		}
		sent <- err
	}()
	// Wait until the transfer is in flight through the server sidecar, then SIGTERM it.
	eventually(t, "transfer in flight", func() error {
		code, body, err := httpGet("http://" + sa.admin + "/peers")
		if err != nil || code != 200 {
			return fmt.Errorf("peers: %d %v", code, err)
		}
		if !strings.Contains(body, clientID) {
			return fmt.Errorf("no peer yet: %s", body)
		}
		return nil
	})
	_ = server.cmd.Process.Signal(os.Interrupt)
	// New connections are refused while draining.
	eventually(t, "listener closed while draining", func() error {
		c, err := net.DialTimeout("tcp", in, time.Second)
		if err != nil {
			return nil
		}
		c.Close()
		return fmt.Errorf("still accepting")
	})
	if err := <-sent; err != nil {
		t.Fatalf("send during drain: %v", err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("read digest: %v", err)
	}
	if got := strings.TrimSpace(line); got != want {
		t.Fatalf("digest %s, want %s: bytes lost in the drain", got, want)
	}
	select {
	case <-server.done:
	case <-time.After(30 * time.Second):
		t.Fatal("server sidecar did not exit after the drain")
	}
	if code := server.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("server sidecar exit %d after drain, want 0", code)
	}
}

func TestIdentityPeersAndInspectCommands(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	app := echoApp(t)
	in, out := freeAddr(t), freeAddr(t)
	sa, ca := newSidecarAddrs(t), newSidecarAddrs(t)
	start(t, append(append([]string{"run", "--mode", "STRICT", "--inbound-explicit", in + "=" + app}, fileIdentity(t, pki, serverID)...), sa.flags()...)...)
	start(t, append(append([]string{"run", "--outbound-explicit", out + "=" + in + "#" + serverID}, fileIdentity(t, pki, clientID)...), ca.flags()...)...)
	sa.waitReady(t)
	ca.waitReady(t)

	r := runCmd(t, nil, "identity", "--admin", sa.admin)
	if r.code != 0 || !strings.Contains(r.stdout, serverID) || !strings.Contains(r.stdout, "files") {
		t.Fatalf("identity: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = runCmd(t, nil, "identity", "--admin", sa.admin, "-o", "pem")
	if r.code != 0 || strings.Count(r.stdout, "BEGIN CERTIFICATE") != 2 || strings.Contains(r.stdout, "PRIVATE KEY") {
		t.Fatalf("identity -o pem: want the 2-cert chain and no key, got exit %d\n%s", r.code, r.stdout)
	}

	conn, err := net.DialTimeout("tcp", out, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(conn).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	r = runCmd(t, nil, "peers", "--admin", sa.admin)
	// Two meshproxy sidecars pool their connections (HBONE negotiated by default).
	if r.code != 0 || !strings.Contains(r.stdout, clientID) || !strings.Contains(r.stdout, "hbone") {
		t.Fatalf("peers: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	r = runCmd(t, nil, "peers", "--admin", sa.admin, "-o", "json")
	var peers []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &peers); err != nil || len(peers) == 0 {
		t.Fatalf("peers -o json: %v\n%s", err, r.stdout)
	}

	bundleDir := t.TempDir()
	bundle := filepath.Join(bundleDir, "root.pem")
	testpki.WriteFile(t, bundle, testpki.PEMCerts(pki.Root))
	// No client certificate: a STRICT peer still shows who it is.
	r = runCmd(t, nil, "inspect", in, "--bundle", bundle)
	if r.code != 0 || !strings.Contains(r.stdout, serverID) || !strings.Contains(r.stdout, "TLS 1.3") || !strings.Contains(r.stdout, "istio") {
		t.Fatalf("inspect: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	// Against another root the peer does not verify: exit 1 and say so.
	other := testpki.New(t, "cluster.local")
	otherBundle := filepath.Join(bundleDir, "other.pem")
	testpki.WriteFile(t, otherBundle, testpki.PEMCerts(other.Root))
	r = runCmd(t, nil, "inspect", in, "--bundle", otherBundle, "-o", "json")
	if r.code != 1 || !strings.Contains(r.stdout, `"verified": false`) {
		t.Fatalf("inspect with a foreign bundle: exit %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
