package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
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
	if n, from := def.apply(noEnv); n != defaultConcurrency || from != "default" || runtime.GOMAXPROCS(0) != defaultConcurrency {
		t.Errorf("default on 3 CPUs: %d from %q, GOMAXPROCS %d; want %d", n, from, runtime.GOMAXPROCS(0), defaultConcurrency)
	}
	runtime.GOMAXPROCS(1) // as the runtime does on a machine with one CPU
	def = concurrencyFlag{n: defaultConcurrency}
	if n, _ := def.apply(noEnv); n != 1 || runtime.GOMAXPROCS(0) != 1 {
		t.Errorf("default on 1 CPU: %d, GOMAXPROCS %d; want 1 kept", n, runtime.GOMAXPROCS(0))
	}

	runtime.GOMAXPROCS(3) // as the runtime does for GOMAXPROCS=3
	def = concurrencyFlag{n: defaultConcurrency}
	if n, from := def.apply(withEnv); n != 3 || from != "GOMAXPROCS" || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("$GOMAXPROCS=3: %d from %q, GOMAXPROCS %d; want 3 kept", n, from, runtime.GOMAXPROCS(0))
	}

	var given concurrencyFlag
	if err := given.Set("2"); err != nil {
		t.Fatal(err)
	}
	if n, from := given.apply(withEnv); n != 2 || from != "--concurrency" || runtime.GOMAXPROCS(0) != 2 {
		t.Errorf("--concurrency 2 with $GOMAXPROCS=3: %d from %q, GOMAXPROCS %d; want 2", n, from, runtime.GOMAXPROCS(0))
	}

	runtime.GOMAXPROCS(3)
	var zero concurrencyFlag
	if err := zero.Set("0"); err != nil {
		t.Fatal(err)
	}
	if n, _ := zero.apply(noEnv); n != 3 || runtime.GOMAXPROCS(0) != 3 {
		t.Errorf("--concurrency 0: %d, GOMAXPROCS %d; want the runtime's 3 kept", n, runtime.GOMAXPROCS(0))
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
		{"default on 64 CPUs", concurrencyFlag{n: defaultConcurrency}, noEnv, 64, defaultConcurrency, true},
		{"default on 2 CPUs", concurrencyFlag{n: defaultConcurrency}, noEnv, 2, 0, false},
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
	defaultWant := fmt.Sprintf("concurrency=%d from=default", min(defaultConcurrency, cpus))
	if cpus > defaultConcurrency {
		defaultWant = fmt.Sprintf(`concurrency=%d from="default, set at start"`, defaultConcurrency)
	}
	restarted := map[string]string{"default": "", "flag": "1"} // the GOMAXPROCS a restart sets
	if cpus > defaultConcurrency {
		restarted["default"] = strconv.Itoa(defaultConcurrency)
	}
	if cpus == 1 {
		restarted["flag"] = ""
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
		{"flag", nil, []string{"--concurrency", "1"}, "concurrency=1 from=--concurrency"},
		{"GOMAXPROCS", []string{"GOMAXPROCS=3"}, nil, "concurrency=3 from=GOMAXPROCS"},
		{"flag over GOMAXPROCS", []string{"GOMAXPROCS=3"}, []string{"--concurrency", "2"}, "concurrency=2 from=--concurrency"},
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
