package e2e

import (
	"os/exec"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// binary is the meshproxy binary built once for all tests.
var binary string

func TestMain(m *testing.M) { e2eutil.Main(m, "e2e", &binary) }

// result is the outcome of a command run to completion.
type result struct {
	code   int
	stdout string
	stderr string
}

// runCmd runs meshproxy with args to completion (bounded by 60 s).
func runCmd(t *testing.T, env []string, args ...string) result {
	t.Helper()
	r := e2eutil.Run(t, binary, env, args...)
	return result{code: r.Code, stdout: r.Stdout, stderr: r.Stderr}
}

// process is a long-running meshproxy process.
type process struct {
	*e2eutil.Process
	cmd  *exec.Cmd
	done <-chan struct{}
}

// start launches meshproxy with args; it is killed at test cleanup.
func start(t *testing.T, args ...string) *process {
	t.Helper()
	return startEnv(t, nil, args...)
}

// startEnv is start with extra environment variables.
func startEnv(t *testing.T, env []string, args ...string) *process {
	t.Helper()
	p := e2eutil.Start(t, binary, env, args...)
	return &process{Process: p, cmd: p.Cmd, done: p.Done()}
}

// freeAddr returns a loopback address with a port free right now.
func freeAddr(t *testing.T) string { return e2eutil.FreeAddr(t) }

// eventually retries fn every 50 ms until it succeeds or 20 s pass.
func eventually(t *testing.T, what string, fn func() error) {
	t.Helper()
	e2eutil.Eventually(t, what, 20*time.Second, fn)
}

// httpGet returns the status and body of a GET.
func httpGet(url string) (int, string, error) { return e2eutil.HTTPGet(url) }

// sidecarAddrs are the addresses one sidecar process uses.
type sidecarAddrs struct{ admin, health, metrics string }

func newSidecarAddrs(t *testing.T) sidecarAddrs {
	s := e2eutil.NewSidecar(t)
	return sidecarAddrs{admin: s.Admin, health: s.Health, metrics: s.Metrics}
}

func (a sidecarAddrs) sidecar() e2eutil.Sidecar {
	return e2eutil.Sidecar{Admin: a.admin, Health: a.health, Metrics: a.metrics}
}

func (a sidecarAddrs) flags() []string { return a.sidecar().Flags() }

func (a sidecarAddrs) waitReady(t *testing.T) {
	t.Helper()
	eventually(t, "sidecar ready on "+a.health, a.sidecar().Ready)
}

// fileIdentity writes an SVID for id issued by ca into a fresh directory and
// returns the identity flags of `meshproxy run`.
func fileIdentity(t *testing.T, ca *testpki.CA, id string) []string {
	return e2eutil.FileIdentity(t, ca, id)
}

// echoApp is a TCP server that echoes every byte back; it stops at cleanup.
func echoApp(t *testing.T) string { return e2eutil.EchoApp(t) }
