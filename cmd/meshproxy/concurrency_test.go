package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
)

// TestConcurrencyFlag: --concurrency sets GOMAXPROCS; given on the command
// line it wins over $GOMAXPROCS, which wins over the default; 0 keeps the
// runtime's choice; nonsense is refused.
func TestConcurrencyFlag(t *testing.T) {
	before := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(before) })
	noEnv := func(string) string { return "" }
	withEnv := func(k string) string {
		if k == "GOMAXPROCS" {
			return "3"
		}
		return ""
	}

	runtime.GOMAXPROCS(3)
	def := concurrencyFlag{n: defaultConcurrency}
	if n, from, follow := def.apply(noEnv); n != 1 || from != "default" || follow != defaultConcurrency || runtime.GOMAXPROCS(0) != 1 {
		t.Errorf("default on 3 CPUs: %d from %q up to %d, GOMAXPROCS %d; want 1 up to %d", n, from, follow, runtime.GOMAXPROCS(0), defaultConcurrency)
	}
	runtime.GOMAXPROCS(1) // as the runtime does on a machine with one CPU
	def = concurrencyFlag{n: defaultConcurrency}
	if n, _, follow := def.apply(noEnv); n != 1 || follow != 0 || runtime.GOMAXPROCS(0) != 1 {
		t.Errorf("default on 1 CPU: %d up to %d, GOMAXPROCS %d; want 1, fixed", n, follow, runtime.GOMAXPROCS(0))
	}
	restarted := func(k string) string { // what a restart by the default sets, from a runtime that started with 2
		return map[string]string{"GOMAXPROCS": "1", restartedEnv: "2"}[k]
	}
	runtime.GOMAXPROCS(1)
	def = concurrencyFlag{n: defaultConcurrency}
	if n, from, follow := def.apply(restarted); n != 1 || from != "default" || follow != 2 {
		t.Errorf("default, restarted from 2: %d from %q up to %d; want 1 from default up to 2", n, from, follow)
	}

	runtime.GOMAXPROCS(3) // as the runtime does for GOMAXPROCS=3
	def = concurrencyFlag{n: defaultConcurrency}
	if n, from, follow := def.apply(withEnv); n != 3 || from != "GOMAXPROCS" || follow != 0 || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("$GOMAXPROCS=3: %d from %q up to %d, GOMAXPROCS %d; want 3 kept, fixed", n, from, follow, runtime.GOMAXPROCS(0))
	}

	var given concurrencyFlag
	if err := given.Set("2"); err != nil {
		t.Fatal(err)
	}
	if n, from, follow := given.apply(withEnv); n != 2 || from != "--concurrency" || follow != 0 || runtime.GOMAXPROCS(0) != 2 {
		t.Errorf("--concurrency 2 with $GOMAXPROCS=3: %d from %q up to %d, GOMAXPROCS %d; want 2, fixed", n, from, follow, runtime.GOMAXPROCS(0))
	}

	runtime.GOMAXPROCS(3)
	var zero concurrencyFlag
	if err := zero.Set("0"); err != nil {
		t.Fatal(err)
	}
	if n, _, follow := zero.apply(noEnv); n != 3 || follow != 0 || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("--concurrency 0: %d up to %d, GOMAXPROCS %d; want the runtime's 3 kept", n, follow, runtime.GOMAXPROCS(0))
	}

	var auto concurrencyFlag
	if err := auto.Set("3"); err != nil {
		t.Fatal(err)
	}
	if err := auto.Set("auto"); err != nil || auto.set || auto.n != defaultConcurrency || auto.String() != "auto" {
		t.Errorf("Set(auto) after 3: %v, set %v, n %d, String %q; want the default back", err, auto.set, auto.n, auto.String())
	}

	for _, bad := range []string{"-1", "x", "1025", ""} {
		var c concurrencyFlag
		if err := c.Set(bad); err == nil || !strings.Contains(err.Error(), "1..1024") {
			t.Errorf("Set(%q) = %v, want a range error", bad, err)
		}
	}
}

// TestConcurrencyStartCount: a process whose runtime started with another
// processor count than --concurrency wants is restarted with GOMAXPROCS set,
// unless the operator set $GOMAXPROCS or asked for the runtime's choice;
// a restarted process (GOMAXPROCS now set) never restarts again.
func TestConcurrencyStartCount(t *testing.T) {
	noEnv := func(string) string { return "" }
	withEnv := func(k string) string {
		if k == "GOMAXPROCS" {
			return "3"
		}
		return ""
	}
	flag := func(v string) concurrencyFlag {
		var c concurrencyFlag
		if err := c.Set(v); err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tc := range []struct {
		name    string
		c       concurrencyFlag
		getenv  func(string) string
		started int
		want    int
		restart bool
	}{
		{"default on 64 CPUs", concurrencyFlag{n: defaultConcurrency}, noEnv, 64, 1, true},
		{"default on 2 CPUs", concurrencyFlag{n: defaultConcurrency}, noEnv, 2, 1, true},
		{"default on 1 CPU", concurrencyFlag{n: defaultConcurrency}, noEnv, 1, 0, false},
		{"--concurrency 1 on 2 CPUs", flag("1"), noEnv, 2, 1, true},
		{"--concurrency 4 on 2 CPUs", flag("4"), noEnv, 2, 4, true},
		{"--concurrency 2 on 2 CPUs", flag("2"), noEnv, 2, 0, false},
		{"--concurrency 0", flag("0"), noEnv, 64, 0, false},
		{"$GOMAXPROCS set", concurrencyFlag{n: defaultConcurrency}, withEnv, 3, 0, false},
		{"$GOMAXPROCS and --concurrency", flag("1"), withEnv, 3, 0, false},
	} {
		n, restart := tc.c.startCount(tc.getenv, tc.started)
		if restart != tc.restart || restart && n != tc.want {
			t.Errorf("%s: startCount = %d, %v; want %d, %v", tc.name, n, restart, tc.want, tc.restart)
		}
	}
}

// TestRunAppliesConcurrency: the sidecar process runs with the GOMAXPROCS
// --concurrency chose (its debug log says which and why): at most 2 by default,
// $GOMAXPROCS when set, the flag over both.
func TestRunAppliesConcurrency(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the meshproxy binary")
	}
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set in the environment: every case would take it")
	}
	// The sidecar's runtime starts with the machine's CPUs; where that is
	// not what --concurrency wants, the process restarts itself with
	// GOMAXPROCS set (the same PID), and says so for the default.
	cpus := runtime.NumCPU()
	upTo := min(defaultConcurrency, cpus)
	if upTo < 2 {
		upTo = 0
	}
	defaultWant := fmt.Sprintf("concurrency=1 from=default up_to=%d", upTo)
	restarted := map[string]string{"default": "1", "flag": "1"} // the GOMAXPROCS a restart sets
	if cpus == 1 {
		restarted = map[string]string{"default": "", "flag": ""}
	}
	bin := gwBuild(t)
	ca := testpki.New(t, "cluster.local")
	cert, key, bundle := ca.WriteSVID(t, t.TempDir(), ca.Issue(t, "spiffe://cluster.local/ns/demo/sa/web", time.Hour))
	for _, tc := range []struct {
		name  string
		env   []string
		flags []string
		want  string
	}{
		{"default", nil, nil, defaultWant},
		{"flag", nil, []string{"--concurrency", "1"}, "concurrency=1 from=--concurrency up_to=0"},
		{"GOMAXPROCS", []string{"GOMAXPROCS=3"}, nil, "concurrency=3 from=GOMAXPROCS up_to=0"},
		{"flag over GOMAXPROCS", []string{"GOMAXPROCS=3"}, []string{"--concurrency", "2"}, "concurrency=2 from=--concurrency up_to=0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			health := gwFreePort(t)
			args := append([]string{"run", "--cert-file", cert, "--key-file", key, "--bundle-file", bundle,
				"--inbound-explicit", fmt.Sprintf("127.0.0.1:%d=127.0.0.1:1", gwFreePort(t)),
				"--admin", "off", "--metrics", "off", "--health", fmt.Sprintf("127.0.0.1:%d", health)}, tc.flags...)
			p := &gwProc{Process: e2eutil.Start(t, bin, append([]string{"MESHPROXY_LOG_LEVEL=debug"}, tc.env...), args...), name: "run"}
			gwWaitReady(t, p, health)
			if out := p.Output.String(); !strings.Contains(out, `msg="go scheduler" `+tc.want) {
				t.Errorf("log does not say %q:\n%s", tc.want, out)
			}
			if want, ok := restarted[tc.name]; ok {
				environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.Cmd.Process.Pid))
				if err != nil {
					t.Fatal(err)
				}
				env := strings.Split(string(environ), "\x00")
				got := ""
				for _, kv := range env {
					if v, ok := strings.CutPrefix(kv, "GOMAXPROCS="); ok {
						got = v
					}
				}
				if got != want {
					t.Errorf("the sidecar (pid %d) runs with GOMAXPROCS=%q in its environment; want %q (restarted at start: %v)", p.Cmd.Process.Pid, got, want, want != "")
				}
			}
		})
	}
}

// TestSidecarFollowsADownload: with the default concurrency a running
// sidecar has one Go processor while idle, takes a second while a download
// runs through it (its copy loop never waits, and with one processor the
// other connections would wait for it), and gives it back once the
// download ends. What it has is go_sched_gomaxprocs_threads on /metrics.
// The re-execution that starts it at one processor keeps its name.
func TestSidecarFollowsADownload(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the meshproxy binary")
	}
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set in the environment: the sidecar would keep it")
	}
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU: the default is one processor, nothing to follow")
	}
	// The app: every connection gets zeros until it closes or 20 s pass.
	app := proxytest.StartApp(t, 20*time.Second, func(c net.Conn) {
		buf := make([]byte, 256<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return // closed, or the 20 s deadline
			}
		}
	})

	bin := gwBuild(t)
	ca := testpki.New(t, "cluster.local")
	cert, key, bundle := ca.WriteSVID(t, t.TempDir(), ca.Issue(t, "spiffe://cluster.local/ns/demo/sa/web", time.Hour))
	health, metricsPort, inbound := gwFreePort(t), gwFreePort(t), gwFreePort(t)
	p := gwStart(t, bin, "run", "--cert-file", cert, "--key-file", key, "--bundle-file", bundle,
		"--inbound-explicit", fmt.Sprintf("127.0.0.1:%d=%s", inbound, app.Addr()), // PERMISSIVE: plaintext passes
		"--admin", "off", "--metrics", fmt.Sprintf("127.0.0.1:%d", metricsPort), "--health", fmt.Sprintf("127.0.0.1:%d", health))
	gwWaitReady(t, p, health)

	// run re-executed the binary to start at one processor, and the process
	// kept the binary's name (what ps and top show), not "exe".
	pid := p.Cmd.Process.Pid
	if environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid)); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(string(environ), restartedEnv+"=") {
		t.Fatalf("the sidecar did not re-execute itself (no %s in its environment)", restartedEnv)
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err != nil {
		t.Fatal(err)
	} else if got, want := strings.TrimSpace(string(comm)), filepath.Base(bin); got != want {
		t.Errorf("after re-executing, the process is named %q, want %q", got, want)
	}

	procs := func() int {
		t.Helper()
		n, err := e2eutil.Metric(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort), "go_sched_gomaxprocs_threads")
		if err != nil || n < 1 {
			t.Fatalf("go_sched_gomaxprocs_threads on /metrics: %v, %v", n, err)
		}
		return int(n)
	}
	// waitFor polls until the sidecar has want processors or limit passes.
	waitFor := func(want int, limit time.Duration, what string) {
		t.Helper()
		e2eutil.Eventually(t, what, limit, func() error {
			if got := procs(); got != want {
				return fmt.Errorf("the sidecar has %d Go processors, want %d\n%s", got, want, p.Output.String())
			}
			return nil
		})
	}
	waitFor(1, 3*time.Second, "idle")

	c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", inbound))
	if err != nil {
		t.Fatal(err)
	}
	// A client speaks first (else the sidecar waits --detect-timeout to
	// tell plaintext from TLS).
	if _, err := c.Write([]byte("GET\n")); err != nil {
		t.Fatal(err)
	}
	downloaded := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, c)
		downloaded <- n
	}()
	waitFor(2, 5*time.Second, "during a download")
	c.Close()
	if n := <-downloaded; n < 32<<20 {
		t.Errorf("downloaded %d bytes, want a bulk transfer", n)
	}
	// Back to one after 2 s without bulk data or much CPU.
	waitFor(1, 8*time.Second, "after the download")
	for _, want := range []string{`msg="go scheduler resized" concurrency=2 was=1`, `msg="go scheduler resized" concurrency=1 was=2`} {
		if out := p.Output.String(); !strings.Contains(out, want) {
			t.Errorf("the log does not say %s:\n%s", want, out)
		}
	}
}
