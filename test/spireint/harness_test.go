package spireint

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	trustDomain = "example.org"
	// agentAlias is the node entry `token generate -spiffeID` creates for
	// the agent; workload entries hang below it.
	agentAlias = "spiffe://" + trustDomain + "/host/agent"
	clientID   = "spiffe://" + trustDomain + "/ns/demo/sa/client"
	serverID   = "spiffe://" + trustDomain + "/ns/demo/sa/server"
	// svidTTL is short so the agent re-issues SVIDs (at half life) while a
	// test runs.
	svidTTL = 20 * time.Second
	// waitLimit bounds every wait on SPIRE; generous for a loaded machine.
	waitLimit = 90 * time.Second
)

// entry is a workload registration: SPIFFE ID and unix attestor selectors.
type entry struct {
	id        string
	selectors []string
}

// deployment is one SPIRE server and one agent on loopback, with sqlite,
// in-memory keys and sockets in a private temporary directory.
type deployment struct {
	t          *testing.T
	dir        string
	serverSock string
	agentSock  string
	serverLog  string
	agentLog   string
	bundlePEM  []byte // the trust domain's roots, from `spire-server bundle show`
}

// startSPIRE starts a server, registers entries below the agent, starts
// the agent with a join token and waits until both are healthy. Everything
// is stopped and removed when the test ends.
func startSPIRE(t *testing.T, entries ...entry) *deployment {
	t.Helper()
	// Socket paths must stay under ~107 bytes; t.TempDir() may be longer.
	dir, err := os.MkdirTemp("", "spire")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &deployment{
		t:          t,
		dir:        dir,
		serverSock: filepath.Join(dir, "server.sock"),
		agentSock:  filepath.Join(dir, "agent.sock"),
		serverLog:  filepath.Join(dir, "server.log"),
		agentLog:   filepath.Join(dir, "agent.log"),
	}
	port := freePort(t)
	d.writeFile("server.conf", fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    ca_ttl = "1h"
    default_x509_svid_ttl = "%ds"
}

plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    KeyManager "memory" {
        plugin_data {}
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
}
`, port, d.serverSock, trustDomain, filepath.Join(dir, "server-data"), int(svidTTL.Seconds()), filepath.Join(dir, "datastore.sqlite3")))
	d.start(spireBin.server, d.serverLog, "run", "-config", filepath.Join(dir, "server.conf"))
	d.waitHealthy(spireBin.server, d.serverSock, "spire-server")

	d.bundlePEM = []byte(d.ctl(spireBin.server, "bundle", "show", "-socketPath", d.serverSock))
	d.writeFile("bundle.pem", string(d.bundlePEM))
	out := d.ctl(spireBin.server, "token", "generate", "-socketPath", d.serverSock, "-spiffeID", agentAlias, "-ttl", "3600")
	token, ok := strings.CutPrefix(strings.TrimSpace(strings.SplitN(out, "\n", 2)[0]), "Token: ")
	if !ok || token == "" {
		d.fatalf("token generate printed no token: %q", out)
	}
	for _, e := range entries {
		args := []string{"entry", "create", "-socketPath", d.serverSock, "-parentID", agentAlias, "-spiffeID", e.id}
		for _, s := range e.selectors {
			args = append(args, "-selector", s)
		}
		d.ctl(spireBin.server, args...)
	}

	d.writeFile("agent.conf", fmt.Sprintf(`agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = %q
    trust_bundle_path = %q
    trust_domain = %q
}

plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {
            # unix:path selectors tell apart workloads that share a uid.
            discover_workload_path = true
            # -1: no sha256 of the binary (a test binary is large).
            workload_size_limit = -1
        }
    }
}
`, filepath.Join(dir, "agent-data"), port, d.agentSock, filepath.Join(dir, "bundle.pem"), trustDomain))
	d.start(spireBin.agent, d.agentLog, "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", token)
	d.waitHealthy(spireBin.agent, d.agentSock, "spire-agent")
	return d
}

// addr is the agent's Workload API address.
func (d *deployment) addr() string { return "unix://" + d.agentSock }

func (d *deployment) writeFile(name, content string) {
	d.t.Helper()
	if err := os.WriteFile(filepath.Join(d.dir, name), []byte(content), 0o600); err != nil {
		d.t.Fatal(err)
	}
}

// start runs a SPIRE process with its output in logPath; it is stopped
// (SIGTERM, then SIGKILL after 15 s) when the test ends.
func (d *deployment) start(bin, logPath string, args ...string) {
	d.t.Helper()
	logFile, err := os.Create(logPath)
	if err != nil {
		d.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = d.dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		d.t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	d.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logFile.Close()
		if d.t.Failed() {
			d.t.Logf("%s log (tail):\n%s", filepath.Base(bin), tail(logPath, 60))
		}
	})
}

// ctl runs a SPIRE CLI command and returns its standard output.
func (d *deployment) ctl(bin string, args ...string) string {
	d.t.Helper()
	out, err := d.run(bin, args...)
	if err != nil {
		d.fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return out
}

func (d *deployment) run(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = d.dir
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String() + errOut.String(), err
	}
	return out.String(), nil
}

// waitHealthy polls `<bin> healthcheck` until it passes or waitLimit ends.
func (d *deployment) waitHealthy(bin, sock, what string) {
	d.t.Helper()
	deadline := time.Now().Add(waitLimit)
	var last string
	for attempt := 0; attempt < 1000; attempt++ {
		out, err := d.run(bin, "healthcheck", "-socketPath", sock)
		if err == nil {
			return
		}
		last = strings.TrimSpace(out)
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	d.fatalf("%s not healthy after %s: %s", what, waitLimit, last)
}

// fatalf fails the test with the tails of both SPIRE logs appended.
func (d *deployment) fatalf(format string, args ...any) {
	d.t.Helper()
	d.t.Fatalf("%s\n--- spire-server log (tail):\n%s\n--- spire-agent log (tail):\n%s",
		fmt.Sprintf(format, args...), tail(d.serverLog, 40), tail(d.agentLog, 40))
}

// logs returns the tails of both SPIRE logs, for failure messages.
func (d *deployment) logs() string {
	return fmt.Sprintf("--- spire-server log (tail):\n%s\n--- spire-agent log (tail):\n%s", tail(d.serverLog, 40), tail(d.agentLog, 40))
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// pathSelector is the unix attestor's selector for a binary at path.
func pathSelector(t *testing.T, path string) string {
	t.Helper()
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		t.Fatal(err)
	}
	return "unix:path:" + real
}
