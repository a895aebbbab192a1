package cluster

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestScriptsPassShellcheck: the cluster's scripts are bash with strict
// mode, executable, and clean under shellcheck.
func TestScriptsPassShellcheck(t *testing.T) {
	scripts, err := filepath.Glob("*.sh")
	if err != nil || len(scripts) < 5 {
		t.Fatalf("scripts: %v %v", scripts, err)
	}
	scripts = append(scripts, "tools/build.sh")
	for _, s := range scripts {
		data, err := os.ReadFile(s)
		if err != nil {
			t.Fatal(err)
		}
		if s == "env.sh" {
			continue // sourced settings
		}
		if !strings.HasPrefix(string(data), "#!/usr/bin/env bash\n") || !strings.Contains(string(data), "\nset -euo pipefail\n") {
			t.Errorf("%s: want a bash shebang and set -euo pipefail", s)
		}
		if fi, err := os.Stat(s); err != nil || fi.Mode()&0o111 == 0 {
			t.Errorf("%s: not executable", s)
		}
	}
	bin, err := exec.LookPath("shellcheck")
	if err != nil {
		t.Skip("shellcheck not installed (.ci/run installs it): scripts not linted")
	}
	out, err := exec.Command(bin, append([]string{"--shell=bash", "--external-sources"}, scripts...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("shellcheck: %v\n%s", err, out)
	}
}

// TestNodePortsAvoidOtherTestsPorts: kube-proxy's NodePort rules live in the
// host's namespace while other packages' tests run, so the NodePort range
// must not overlap the loopback ports internal/e2eutil hands out nor the
// kernel's ephemeral range.
func TestNodePortsAvoidOtherTestsPorts(t *testing.T) {
	env, err := os.ReadFile("env.sh")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^CLUSTER_NODEPORT_RANGE=(\d+)-(\d+)$`).FindSubmatch(env)
	if m == nil {
		t.Fatal("env.sh: no CLUSTER_NODEPORT_RANGE=LOW-HIGH")
	}
	low, _ := strconv.Atoi(string(m[1]))
	high, _ := strconv.Atoi(string(m[2]))
	src, err := os.ReadFile("../../internal/e2eutil/sidecar.go")
	if err != nil {
		t.Fatal(err)
	}
	e2eLow := regexp.MustCompile(`portLow\s*=\s*(\d+)`).FindSubmatch(src)
	e2eHigh := regexp.MustCompile(`portHigh\s*=\s*(\d+)`).FindSubmatch(src)
	if e2eLow == nil || e2eHigh == nil {
		t.Fatal("internal/e2eutil/sidecar.go: portLow/portHigh not found; update this test")
	}
	pl, _ := strconv.Atoi(string(e2eLow[1]))
	ph, _ := strconv.Atoi(string(e2eHigh[1]))
	if low <= ph && pl <= high {
		t.Errorf("NodePort range %d-%d overlaps e2eutil's ports %d-%d", low, high, pl, ph)
	}
	if eph, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		f := strings.Fields(string(eph))
		el, _ := strconv.Atoi(f[0])
		eh, _ := strconv.Atoi(f[1])
		if low <= eh && el <= high {
			t.Errorf("NodePort range %d-%d overlaps the ephemeral range %d-%d", low, high, el, eh)
		}
	}
}
