package cluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// The suite's shared state, set once by TestMain.
var (
	// clusterEnv holds env.sh's settings (CLUSTER_STATE, K8S_BIN, ...).
	clusterEnv map[string]string
	// dir is this package's directory; repoRoot the repository's.
	dir, repoRoot string
	// meshproxyCLI is a workstation meshproxy (with inject).
	meshproxyCLI string
	// setupErr, if set, fails every test: the cluster did not come up.
	setupErr error
	// skipReason, if set, skips every test.
	skipReason string
	// before is the machine as TestMain found it, for the down test.
	before machineState
)

func TestMain(m *testing.M) {
	flag.Parse()
	code := 0
	func() {
		if testing.Short() {
			skipReason = "the Kubernetes suite brings up a real cluster; skipped with -short"
			code = m.Run()
			return
		}
		if os.Geteuid() != 0 {
			skipReason = "the Kubernetes suite needs root (containerd, kubelet, kube-proxy, nftables)"
			code = m.Run()
			return
		}
		unlock, err := lockMachine()
		if err != nil {
			setupErr = err
			code = m.Run()
			return
		}
		defer unlock()
		setupErr = setUp()
		code = m.Run()
		if out, err := runScript(5*time.Minute, "down.sh"); err != nil {
			fmt.Fprintf(os.Stderr, "cluster: down.sh after the suite: %v\n%s", err, out)
			code = 1
		}
	}()
	if meshproxyCLI != "" {
		os.RemoveAll(filepath.Dir(meshproxyCLI))
	}
	os.Exit(code)
}

// lockMachine takes the machine-wide lock: the cluster's ports, bridge and
// state directory are fixed, so suites of several checkouts take turns.
func lockMachine() (func(), error) {
	const path = "/run/meshproxy-cluster.lock"
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		fmt.Fprintf(os.Stderr, "cluster: another checkout's cluster suite holds %s; waiting for it\n", path)
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
	}
	return func() { f.Close() }, nil
}

// setUp tears down any leftover cluster, records the machine's state, brings
// the cluster up and builds the workstation meshproxy.
func setUp() error {
	var err error
	if dir, err = os.Getwd(); err != nil {
		return err
	}
	repoRoot = filepath.Join(dir, "..", "..")
	out, err := exec.Command("bash", filepath.Join(dir, "env.sh"), "print").Output()
	if err != nil {
		return fmt.Errorf("env.sh print: %w", err)
	}
	clusterEnv = map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			clusterEnv[k] = v
		}
	}
	for _, b := range []string{"kube-apiserver", "kubelet", "kubectl", "kube-proxy", "coredns"} {
		if _, err := os.Stat(filepath.Join(clusterEnv["K8S_BIN"], b)); err != nil {
			return fmt.Errorf("%s is not built (%w): run make cluster-tools, which make test does", b, err)
		}
	}
	for _, b := range []string{"containerd", "runc", "etcd", "tcpdump"} {
		if _, err := exec.LookPath(b); err != nil {
			return fmt.Errorf("%s is not installed (.ci/run installs it): %w", b, err)
		}
	}
	if out, err := runScript(5*time.Minute, "down.sh"); err != nil {
		return fmt.Errorf("down.sh before the suite: %w\n%s", err, out)
	}
	before = snapshotMachine()
	if out, err := runScript(5*time.Minute, "up.sh"); err != nil {
		if bytes.Contains(out, []byte("waiting for containerd")) {
			skipReason = "containerd cannot start on this machine:\n" + string(out)
			return nil
		}
		return fmt.Errorf("up.sh: %w\n%s", err, out)
	}
	if out, err := runScript(10*time.Minute, "images.sh", "meshproxy-iptables"); err != nil {
		return fmt.Errorf("images.sh meshproxy-iptables: %w\n%s", err, out)
	}
	tmp, err := os.MkdirTemp("", "meshproxy-cluster-cli-")
	if err != nil {
		return err
	}
	meshproxyCLI = filepath.Join(tmp, "meshproxy")
	build := e2eutil.BuildCommand(context.Background(), meshproxyCLI)
	build.Dir = repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build meshproxy: %w\n%s", err, out)
	}
	return nil
}

// runScript runs one of this directory's scripts with a time limit.
func runScript(limit time.Duration, script string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(dir, script)}, args...)...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s did not finish within %s: %w", script, limit, err)
	}
	return out, err
}

// needCluster skips or fails t unless the cluster is up.
func needCluster(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if setupErr != nil {
		t.Fatalf("the cluster did not come up: %v", setupErr)
	}
}

// kubectl runs kubectl against the cluster, bounded to a minute.
func kubectl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(clusterEnv["K8S_BIN"], "kubectl"),
		append([]string{"--kubeconfig", clusterEnv["CLUSTER_KUBECONFIG"]}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// mustKubectl is kubectl that fails t on error.
func mustKubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := kubectl(args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// applyYAML applies a manifest given as text.
func applyYAML(t *testing.T, manifest string) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "manifest.yaml")
	if err := os.WriteFile(f, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	mustKubectl(t, "apply", "-f", f)
}

// errNotYet marks a condition that has not held yet.
var errNotYet = errors.New("not yet")

// waitFor polls check once a second until it returns nil, and fails t with
// check's last error after limit.
func waitFor(t *testing.T, what string, limit time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not true after %s: %v", what, limit, err)
		}
		time.Sleep(time.Second)
	}
}

// dumpOnFailure logs the state of the namespaces' pods when t fails.
func dumpOnFailure(t *testing.T, namespaces ...string) {
	t.Helper()
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, ns := range namespaces {
			for _, args := range [][]string{
				{"-n", ns, "get", "pods,svc,endpointslices", "-o", "wide"},
				{"-n", ns, "describe", "pods"},
				{"-n", ns, "get", "events", "--sort-by=.lastTimestamp"},
				{"-n", ns, "logs", "--all-containers", "--prefix", "--tail=40", "-l", "app"},
			} {
				out, err := kubectl(args...)
				t.Logf("kubectl %s:\n%s%v", strings.Join(args, " "), out, errOrEmpty(err))
			}
		}
	})
}

func errOrEmpty(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// waitEstablished waits until each CustomResourceDefinition named is
// Established. Not `kubectl wait --for=condition=Established`: on a CRD
// created a moment ago, whose status has no conditions yet, it fails at once
// (".status.conditions accessor error") instead of waiting.
func waitEstablished(t *testing.T, crds ...string) {
	t.Helper()
	for _, crd := range crds {
		waitFor(t, crd+" established", time.Minute, func() error {
			out, err := kubectl("get", "crd", crd, "-o", `jsonpath={.status.conditions[?(@.type=="Established")].status}`)
			if err != nil || strings.TrimSpace(out) != "True" {
				return fmt.Errorf("%w: %q %v", errNotYet, out, err)
			}
			return nil
		})
	}
}
