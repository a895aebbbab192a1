// Package podsecurity checks what `meshproxy inject` produces against the
// Pod Security admission of a real kube-apiserver (server-side dry run in
// namespaces that enforce baseline or restricted). It needs etcd, kubectl and
// the kube-apiserver binary built under
// ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin/.
package podsecurity

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/inject"
)

const k8sVersion = "v1.37.2"

// apiServer is etcd and kube-apiserver on loopback, for one test.
type apiServer struct {
	url, token string
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// start runs a server for the rest of the test; the channel closes when
// it exits.
func start(t *testing.T, name string, args ...string) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cancel()
		<-exited
		if t.Failed() {
			t.Logf("%s said:\n%s", filepath.Base(name), tail(out.String(), 3000))
		}
	})
	return exited
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func newAPIServer(t *testing.T) *apiServer {
	t.Helper()
	cache := os.Getenv("MESHPROXY_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "meshproxy")
	}
	apiserver := filepath.Join(cache, "k8s-"+k8sVersion, "bin", "kube-apiserver")
	if _, err := os.Stat(apiserver); err != nil {
		t.Skipf("kube-apiserver %s not built (%v): the restricted rules are checked by inject's own tests instead", k8sVersion, err)
	}
	for _, tool := range []string{"etcd", "kubectl", "openssl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	dir := t.TempDir()
	etcdPort, peerPort, apiPort := freePort(t), freePort(t), freePort(t)
	_ = start(t, "etcd", "--data-dir", filepath.Join(dir, "etcd"), "--name", "podsecurity",
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", peerPort),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", peerPort),
		"--initial-cluster", fmt.Sprintf("podsecurity=http://127.0.0.1:%d", peerPort))
	key := filepath.Join(dir, "sa.key")
	if out, err := exec.Command("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key).CombinedOutput(); err != nil {
		t.Fatalf("openssl: %v\n%s", err, out)
	}
	pub := filepath.Join(dir, "sa.pub")
	if out, err := exec.Command("openssl", "pkey", "-in", key, "-pubout", "-out", pub).CombinedOutput(); err != nil {
		t.Fatalf("openssl: %v\n%s", err, out)
	}
	s := &apiServer{url: fmt.Sprintf("https://127.0.0.1:%d", apiPort), token: "podsecurity-admin"}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(s.token+",admin,admin,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	exited := start(t, apiserver,
		"--etcd-servers", fmt.Sprintf("http://127.0.0.1:%d", etcdPort),
		"--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(apiPort),
		"--cert-dir", filepath.Join(dir, "certs"), "--token-auth-file", tokens,
		"--authorization-mode", "RBAC", "--anonymous-auth=false",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", pub, "--service-account-signing-key-file", key,
		"--service-cluster-ip-range", "10.96.0.0/16")
	deadline := time.Now().Add(3 * time.Minute)
	for {
		out, err := s.kubectl(nil, "get", "--raw", "/readyz")
		if err == nil && strings.TrimSpace(out) == "ok" {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("kube-apiserver not ready after 3 minutes: %v %s", err, out)
		}
		select {
		case <-exited:
			t.Fatal("kube-apiserver exited")
		case <-time.After(time.Second):
		}
	}
}

func (s *apiServer) kubectl(stdin []byte, args ...string) (string, error) {
	cmd := exec.Command("kubectl", append([]string{"--server", s.url, "--token", s.token,
		"--insecure-skip-tls-verify", "--request-timeout", "60s"}, args...)...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// namespace creates a namespace enforcing level, with its default service
// account (no controller manager runs here to create it).
func (s *apiServer) namespace(t *testing.T, name, level string) {
	t.Helper()
	ns := fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels:
    pod-security.kubernetes.io/enforce: %s
    pod-security.kubernetes.io/enforce-version: latest
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: default
  namespace: %s
`, name, level, name)
	if out, err := s.kubectl([]byte(ns), "apply", "-f", "-"); err != nil {
		t.Fatalf("create namespace %s: %v\n%s", name, err, out)
	}
}

// app is inject/testdata/restricted.yaml (workloads that meet restricted on
// their own) in namespace.
func app(t *testing.T, namespace string) []byte {
	t.Helper()
	b, err := os.ReadFile("../../inject/testdata/restricted.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return bytes.ReplaceAll(b, []byte("namespace: shop"), []byte("namespace: "+namespace))
}

func injected(t *testing.T, src []byte, opts ...inject.Option) []byte {
	t.Helper()
	inj, err := inject.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := inj.Manifest(src)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestInjectedPodsUnderPodSecurityAdmission: the API server admits what
// `inject --capture node` produces in a namespace enforcing restricted, in
// every capture mode and sidecar form; what `inject` produces with the
// capture init container is refused by restricted and by baseline, naming
// NET_ADMIN.
func TestInjectedPodsUnderPodSecurityAdmission(t *testing.T) {
	s := newAPIServer(t)
	s.namespace(t, "restricted-ns", "restricted")
	s.namespace(t, "baseline-ns", "baseline")
	if out, err := s.kubectl(app(t, "restricted-ns"), "apply", "--dry-run=server", "-f", "-"); err != nil {
		t.Fatalf("the application alone is refused by restricted (fix the fixture): %v\n%s", err, out)
	}
	for _, mode := range []inject.Mode{inject.ModeNFTables, inject.ModeIPTables, inject.ModeEBPF} {
		for _, native := range []bool{true, false} {
			name := fmt.Sprintf("%s/native=%v", mode, native)
			t.Run("node/"+name, func(t *testing.T) {
				m := injected(t, app(t, "restricted-ns"), inject.WithCapture(inject.CaptureNode), inject.WithMode(mode), inject.WithNativeSidecar(native))
				if out, err := s.kubectl(m, "apply", "--dry-run=server", "-f", "-"); err != nil {
					t.Fatalf("restricted namespace refuses node capture: %v\n%s", err, out)
				}
			})
			t.Run("init/"+name, func(t *testing.T) {
				for _, ns := range []string{"restricted-ns", "baseline-ns"} {
					m := injected(t, app(t, ns), inject.WithMode(mode), inject.WithNativeSidecar(native))
					out, err := s.kubectl(m, "apply", "--dry-run=server", "-f", "-")
					if err == nil || !strings.Contains(out, "violates PodSecurity") || !strings.Contains(out, "NET_ADMIN") {
						t.Fatalf("%s admits the capture init container: %v\n%s", ns, err, out)
					}
				}
			})
		}
	}
}
