// Package podsecurity checks what `meshproxy inject` produces against the
// Pod Security admission of a real kube-apiserver (server-side dry run in
// namespaces that enforce baseline or restricted). It needs etcd, kubectl and
// the kube-apiserver binary built under
// ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}/k8s-v1.37.2/bin/.
package podsecurity

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/inject"
	"github.com/meshproxy/meshproxy/internal/kubetest"
)

// apiServer is etcd and kube-apiserver on loopback (internal/kubetest),
// driven with kubectl as an operator would.
type apiServer struct{ *kubetest.Cluster }

func newAPIServer(t *testing.T) *apiServer {
	t.Helper()
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skipf("kubectl not installed: %v", err)
	}
	return &apiServer{kubetest.Start(t)}
}

func (s *apiServer) kubectl(stdin []byte, args ...string) (string, error) {
	cmd := exec.Command("kubectl", append([]string{"--kubeconfig", s.AdminKubeconfig, "--request-timeout", "60s"}, args...)...)
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
