package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/cni"
)

// TestNodeCaptureCommandsRefuseBadFlags: usage errors exit 2 and name the flag.
func TestNodeCaptureCommandsRefuseBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		flag string
	}{
		{[]string{"cni", "validate", "--sentinel", "127.0.0.1:15002"}, "--sentinel"},
		{[]string{"cni", "validate", "--sentinel", "nonsense"}, "--sentinel"},
		{[]string{"cni", "validate", "--attempts", "0"}, "--attempts"},
		{[]string{"cni", "validate", "--timeout", "0s"}, "--timeout"},
		{[]string{"node-agent", "--mode", "ipvs"}, "--mode"},
		{[]string{"node-agent", "--conf-dir", "net.d"}, "--conf-dir"},
		{[]string{"node-agent", "--cgroup-root", "sys/fs/cgroup/unified"}, "--cgroup-root"},
		{[]string{"node-agent", "--interval", "10ms", "--api-server", "https://10.96.0.1"}, "--interval"},
		{[]string{"node-agent", "--api-server", "http://10.96.0.1"}, "--api-server"},
		{[]string{"inject", "-f", "-", "--capture", "sidecar"}, "--capture"},
		{[]string{"inject", "-f", "-", "--capture", "node", "--mode", "ebpf", "--ebpf-cgroup", "/host/sys/fs/cgroup/x"}, "--ebpf-cgroup"},
		{[]string{"inject", "-f", "-", "--capture", "node", "--exclude-outbound-cidrs", "192.0.2.0/24"}, "--capture"},
	} {
		code, out := caExec(t, c.args...)
		if code != 2 || !strings.Contains(out, c.flag) {
			t.Errorf("%v: exit %d, want 2 naming %s:\n%s", c.args, code, c.flag, out)
		}
	}
}

// TestNodeAgentUninstallLeavesTheListAsItWas: --uninstall on a node takes
// the chained entry out again and needs no API server.
func TestNodeAgentUninstallLeavesTheListAsItWas(t *testing.T) {
	dir := t.TempDir()
	bin, conf := filepath.Join(dir, "bin"), filepath.Join(dir, "net.d")
	for _, d := range []string{bin, conf} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	list := `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"` + cni.PluginType + `"}]}`
	if err := os.WriteFile(filepath.Join(conf, "10-n.conflist"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out := caExec(t, "node-agent", "--uninstall", "--bin-dir", bin, "--conf-dir", conf); code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	b, err := os.ReadFile(filepath.Join(conf, "10-n.conflist"))
	if err != nil || strings.Contains(string(b), cni.PluginType) || !strings.Contains(string(b), "bridge") {
		t.Fatalf("list after uninstall: %s %v", b, err)
	}
}

// TestCNIInvocationByName: started as meshproxy-cni (how the runtime runs
// the installed plugin), the binary is the plugin.
func TestCNIInvocationByName(t *testing.T) {
	for name, want := range map[string]bool{"/opt/cni/bin/" + cni.PluginType: true, "meshproxy": false, "/usr/bin/meshproxy-cni-old": false} {
		if got := isCNIInvocation(name); got != want {
			t.Errorf("%s: %v", name, got)
		}
	}
}
