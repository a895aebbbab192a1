package reliability

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

const (
	clientID = "spiffe://cluster.local/ns/demo/sa/client"
	serverID = "spiffe://cluster.local/ns/demo/sa/server"
	wait     = 60 * time.Second // generous: the machine is shared and loaded
)

// meshCA is a CA directory made by `meshproxy ca init`, with a token per
// workload identity, and the address it serves (or will serve) on.
type meshCA struct {
	dir, addr, root, tokens string
	tokenFiles              map[string]string // SPIFFE ID → token file
}

func newMeshCA(t *testing.T) *meshCA {
	t.Helper()
	dir := t.TempDir()
	c := &meshCA{dir: filepath.Join(dir, "ca"), addr: e2eutil.FreeAddr(t), tokens: filepath.Join(dir, "tokens"),
		tokenFiles: map[string]string{}}
	if r := e2eutil.Run(t, binary, nil, "ca", "init", "--dir", c.dir, "--trust-domain", "cluster.local"); r.Code != 0 {
		t.Fatalf("ca init: exit %d: %s", r.Code, r.Stderr)
	}
	c.root = filepath.Join(c.dir, "root-cert.pem")
	var lines strings.Builder
	for i, id := range []string{clientID, serverID} {
		tok := fmt.Sprintf("token-%d-%d", i, time.Now().UnixNano())
		fmt.Fprintf(&lines, "%s %s\n", tok, id)
		c.tokenFiles[id] = filepath.Join(dir, fmt.Sprintf("token-%d", i))
		writeFile(t, c.tokenFiles[id], tok+"\n")
	}
	writeFile(t, c.tokens, lines.String())
	return c
}

// serve starts `meshproxy ca serve` on c.addr.
func (c *meshCA) serve(t *testing.T) *e2eutil.Process {
	t.Helper()
	p := e2eutil.Start(t, binary, nil, "ca", "serve", "--dir", c.dir, "--listen", c.addr,
		"--auth", "token", "--tokens", c.tokens, "--metrics", e2eutil.FreeAddr(t))
	e2eutil.Eventually(t, "ca listening on "+c.addr, wait, func() error {
		conn, err := net.DialTimeout("tcp", c.addr, time.Second)
		if err == nil {
			conn.Close()
		}
		return err
	})
	return p
}

// identity is the `meshproxy run` identity flags for id from this CA.
func (c *meshCA) identity(id string, extra ...string) []string {
	return append([]string{"--ca-addr", c.addr, "--ca-root", c.root, "--token-file", c.tokenFiles[id]}, extra...)
}

// pair is a client sidecar (explicit outbound) in front of a server sidecar
// (explicit inbound, STRICT) in front of an app.
type pair struct {
	client, server         e2eutil.Sidecar
	clientProc, serverProc *e2eutil.Process
	entry                  string // where the client app connects
	inbound                string // the server sidecar's mesh listener
}

// startPair starts both sidecars with the identity flags ident returns for
// each SPIFFE ID, plus extra flags on both, and waits until both are ready.
func startPair(t *testing.T, app string, ident func(id string) []string, extra ...string) *pair {
	t.Helper()
	p := &pair{client: e2eutil.NewSidecar(t), server: e2eutil.NewSidecar(t), entry: e2eutil.FreeAddr(t), inbound: e2eutil.FreeAddr(t)}
	args := func(side e2eutil.Sidecar, id string, listener ...string) []string {
		a := append([]string{"run", "--log-format", "json"}, listener...)
		a = append(a, ident(id)...)
		a = append(a, side.Flags()...)
		return append(a, extra...)
	}
	p.serverProc = e2eutil.Start(t, binary, nil, args(p.server, serverID, "--mode", "STRICT", "--inbound-explicit", p.inbound+"="+app)...)
	p.clientProc = e2eutil.Start(t, binary, nil, args(p.client, clientID, "--outbound-explicit", p.entry+"="+p.inbound+"#"+serverID)...)
	p.server.WaitReady(t)
	p.client.WaitReady(t)
	return p
}

// exchange sends one line through addr and expects it echoed, then closes.
func exchange(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(wait))
	return echoLine(c, bufio.NewReader(c), msg)
}

// echoLine writes msg (a line) on c and expects it back from r.
func echoLine(c net.Conn, r *bufio.Reader, msg string) error {
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got != msg+"\n" {
		return fmt.Errorf("echo %q, want %q", got, msg+"\n")
	}
	return nil
}

// closedByPeer reads c until the other end closes it; the read deadline
// firing means nobody closed it.
func closedByPeer(c net.Conn, within time.Duration) error {
	_ = c.SetReadDeadline(time.Now().Add(within))
	_, err := io.Copy(io.Discard, c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("still open after %s", within)
	}
	return nil
}

// logEntry is one JSON log line of a meshproxy process.
type logEntry struct {
	Time     time.Time `json:"time"`
	Level    string    `json:"level"`
	Msg      string    `json:"msg"`
	Failures int       `json:"failures"`
	Error    string    `json:"err"`
}

// logEntries returns the JSON log lines of p whose message is msg.
func logEntries(p *e2eutil.Process, msg string) []logEntry {
	var out []logEntry
	for _, line := range p.Output.Lines() {
		var e logEntry
		if json.Unmarshal([]byte(line), &e) == nil && e.Msg == msg {
			out = append(out, e)
		}
	}
	return out
}

// resources is what a sidecar process holds: goroutines and descriptors.
type resources struct{ goroutines, fds int }

func sample(t *testing.T, s e2eutil.Sidecar, p *e2eutil.Process) resources {
	t.Helper()
	g, err := s.Goroutines()
	if err != nil {
		t.Fatal(err)
	}
	fds, err := e2eutil.OpenFDs(p.PID())
	if err != nil {
		t.Fatal(err)
	}
	return resources{g, fds}
}

// Tolerances for "back to baseline": a few runtime and HTTP goroutines come
// and go (the pprof request itself, timers); descriptors must all be back
// but for one in flight.
const (
	goroutineSlack = 6
	fdSlack        = 2
)

// backToBaseline waits until s holds no more than base plus the slack.
func backToBaseline(t *testing.T, name string, s e2eutil.Sidecar, p *e2eutil.Process, base resources) resources {
	t.Helper()
	var last resources
	e2eutil.Eventually(t, name+" back to baseline", wait, func() error {
		last = sample(t, s, p)
		if last.goroutines > base.goroutines+goroutineSlack || last.fds > base.fds+fdSlack {
			return fmt.Errorf("goroutines %d (baseline %d), descriptors %d (baseline %d)",
				last.goroutines, base.goroutines, last.fds, base.fds)
		}
		return nil
	})
	return last
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
