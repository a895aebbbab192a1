package reliability

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/fdlimit"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// A sidecar started with a soft descriptor limit of 1024 (hard 2048) raises
// it to 2048 and caps connections at (2048 − 256) / 2 by default; 2,500 idle
// connections are refused past the cap while the admin API and the health
// port keep answering, and the sidecar serves again once they close.
func TestDefaultConnectionCapKeepsAdminAndHealthUp(t *testing.T) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("prlimit (util-linux) not installed: cannot start the sidecar with a low descriptor limit")
	}
	const soft, hard, flood = 1024, 2048, 2500
	raiseNofile(t, flood+1000)
	pki := testpki.New(t, "cluster.local")
	side := e2eutil.NewSidecar(t)
	in := e2eutil.FreeAddr(t)
	args := append([]string{fmt.Sprintf("--nofile=%d:%d", soft, hard), binary, "run", "--log-format", "json",
		"--inbound-explicit", in + "=" + e2eutil.EchoApp(t), "--detect-timeout", "2m"}, e2eutil.FileIdentity(t, pki, serverID)...)
	proc := e2eutil.Start(t, prlimit, nil, append(args, side.Flags()...)...)
	side.WaitReady(t)

	want := fdlimit.MaxConnections(hard, 2)
	var limit struct {
		Max    int    `json:"max_connections"`
		NoFile uint64 `json:"rlimit_nofile"`
	}
	for _, line := range proc.Output.Lines() {
		var e logEntry
		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == "connection limit" {
			_ = json.Unmarshal([]byte(line), &limit)
		}
	}
	if limit.Max != want || limit.NoFile != hard {
		t.Fatalf("connection limit logged as %+v, want max_connections %d from the raised limit %d", limit, want, hard)
	}

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range flood {
		c, err := net.DialTimeout("tcp", in, 10*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", len(held), err)
		}
		held = append(held, c)
	}
	e2eutil.Eventually(t, "connections past the cap refused", wait, func() error {
		n, err := side.Metric("meshproxy_connections_total", "direction", "inbound", "mode", "unknown", "decision", "over_limit")
		if err != nil || n < float64(flood-want) {
			return fmt.Errorf("over_limit = %v (%v), want at least %d", n, err, flood-want)
		}
		return nil
	})
	// Refusals are counted exactly but logged sampled.
	refused, _ := side.Metric("meshproxy_connections_total", "direction", "inbound", "mode", "unknown", "decision", "over_limit")
	if lines := len(logEntries(proc, "connection refused")); float64(lines) >= refused/4 {
		t.Errorf("%d refusal log lines for %v refused connections: not sampled", lines, refused)
	}
	for _, url := range []string{"http://" + side.Admin + "/identity", "http://" + side.Health + "/healthz/ready", "http://" + side.Metrics + "/metrics"} {
		if code, body, err := e2eutil.HTTPGet(url); err != nil || code != http.StatusOK {
			t.Fatalf("at the connection cap, GET %s: %d %v %.200s", url, code, err, body)
		}
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	e2eutil.Eventually(t, "served again after the flood", wait, func() error {
		c, err := net.DialTimeout("tcp", in, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		return echoLine(c, bufio.NewReader(c), "after the flood")
	})
}
