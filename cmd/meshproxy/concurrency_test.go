package main

import (
	"fmt"
	"os"
	"runtime"
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
	bin := gwBuild(t)
	ca := testpki.New(t, "cluster.local")
	cert, key, bundle := ca.WriteSVID(t, t.TempDir(), ca.Issue(t, "spiffe://cluster.local/ns/demo/sa/web", time.Hour))
	for _, tc := range []struct {
		name  string
		env   []string
		flags []string
		want  string
	}{
		{"default", nil, nil, fmt.Sprintf("concurrency=%d from=default", min(defaultConcurrency, runtime.GOMAXPROCS(0)))},
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
		})
	}
}
