package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// runMeshproxy runs the binary with stdin and extra environment and returns
// stdout, stderr and the exit status.
func runMeshproxy(t *testing.T, bin string, stdin []byte, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

const podManifest = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec:\n  containers: [{name: app, image: app}]\n"

func TestInjectCommandRefusesBadFlagsWithUsageError(t *testing.T) {
	bin := meshproxyBinary(t, cliBinary)
	for name, tc := range map[string]struct {
		args []string
		env  []string
		flag string
	}{
		"host bits":       {args: []string{"--mesh-cidrs", "10.0.0.1/8"}, flag: "--mesh-cidrs"},
		"not a cidr":      {args: []string{"--exclude-outbound-cidrs", "10.0.0.0"}, flag: "--exclude-outbound-cidrs"},
		"port 0":          {args: []string{"--exclude-inbound-ports", "80,0"}, flag: "--exclude-inbound-ports"},
		"mode":            {args: []string{"--mode", "pf"}, flag: "--mode"},
		"uid 0":           {args: []string{"--proxy-uid", "0"}, flag: "--proxy-uid"},
		"ca addr":         {args: []string{"--ca-addr", "meshproxy-ca"}, flag: "--ca-addr"},
		"empty image":     {args: []string{"--image", ""}, flag: "--image"},
		"cgroup not ebpf": {args: []string{"--ebpf-cgroup", "/host/sys/fs/cgroup/x"}, flag: "--ebpf-cgroup"},
		"bad env":         {env: []string{"MESHPROXY_MESH_CIDRS=banana"}, flag: "mesh-cidrs"},
		"no file":         {args: []string{}, flag: "--file"},
	} {
		t.Run(name, func(t *testing.T) {
			args := append([]string{"inject"}, tc.args...)
			if name != "no file" {
				args = append(args, "-f", "-")
			}
			stdout, stderr, code := runMeshproxy(t, bin, []byte(podManifest), tc.env, args...)
			if code != 2 || !strings.Contains(stderr, tc.flag) {
				t.Errorf("exit %d, stderr %q: want 2 and a message naming %s", code, stderr, tc.flag)
			}
			if stdout != "" {
				t.Errorf("wrote output on a usage error: %q", stdout)
			}
		})
	}
}

func TestInjectCommandInjectsStdinToStdout(t *testing.T) {
	bin := meshproxyBinary(t, cliBinary)
	stdout, stderr, code := runMeshproxy(t, bin, []byte(podManifest), nil,
		"inject", "-f", "-", "--mesh-cidrs", "10.244.0.0/16", "--image", "meshproxy:test")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"name: meshproxy-init", "name: meshproxy\n", "image: meshproxy:test", "10.244.0.0/16"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	if !strings.Contains(stderr, "document 1: Pod demo/p: injected") {
		t.Errorf("stderr %q does not report the injection", stderr)
	}
	// Through a file and -o, the second pass is byte-identical.
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in.yaml"), filepath.Join(dir, "out.yaml")
	if err := os.WriteFile(in, []byte(stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, code = runMeshproxy(t, bin, nil, []string{"MESHPROXY_MESH_CIDRS=10.244.0.0/16", "MESHPROXY_IMAGE=meshproxy:test"},
		"inject", "-f", in, "-o", out)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	again, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != stdout {
		t.Error("injecting the injected manifest changed it")
	}
}

func TestInjectCommandNamesTheBadDocument(t *testing.T) {
	bin := meshproxyBinary(t, cliBinary)
	src := podManifest + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: [{name: a, image: a, imagePullPolicyy: Always}]\n"
	dir := t.TempDir()
	out := filepath.Join(dir, "out.yaml")
	stdout, stderr, code := runMeshproxy(t, bin, []byte(src), nil, "inject", "-f", "-", "-o", out)
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	for _, want := range []string{"document 2", "line 7", "Deployment web", "spec.template.spec.containers[0].imagePullPolicyy", "unknown field"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr %q lacks %q", stderr, want)
		}
	}
	if stdout != "" {
		t.Error("wrote to stdout on error")
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Error("left an output file behind on error")
	}
	if _, _, code := runMeshproxy(t, bin, nil, nil, "inject", "-f", filepath.Join(dir, "missing.yaml")); code != 1 {
		t.Errorf("missing file: exit %d, want 1", code)
	}
}

func TestImageBinarySaysInjectIsNotBuiltIn(t *testing.T) {
	bin := meshproxyBinary(t, imageBinary)
	_, stderr, code := runMeshproxy(t, bin, []byte(podManifest), nil, "inject", "-f", "-")
	if code != 1 || !strings.Contains(stderr, "not part of this build") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
}
