// Package kubemirror is the end-to-end test of Istio policy the Kubernetes
// way: a real kube-apiserver with Istio's CRDs, `meshproxy ca serve
// --mirror-istio-config` with the shipped RBAC, and real `meshproxy run`
// sidecars that change what they enforce when PeerAuthentication and
// AuthorizationPolicy objects are applied — without a restart.
package kubemirror

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/kubetest"
)

var binary string

func TestMain(m *testing.M) { e2eutil.Main(m, "kubemirror", &binary) }

// enforceWithin bounds how long a `kubectl apply` may take to be enforced.
const enforceWithin = 10 * time.Second

// echoes reports whether a connection to addr carries bytes to the echo app
// and back: nil if it does, an error saying why not.
func echoes(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	msg := []byte("ping\n")
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

func refused(addr string) error {
	if err := echoes(addr); err == nil {
		return errors.New("connection still reaches the app")
	}
	return nil
}

func TestKubectlApplyChangesEnforcementWithoutRestart(t *testing.T) {
	c := kubetest.Start(t)
	c.InstallIstioCRDs(t)
	c.Apply(t, []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: web\n"))
	caKubeconfig := c.ServiceAccountKubeconfig(t, "istio-system", "meshproxy-ca")
	rbac, err := os.ReadFile("../../deploy/kubernetes/base/ca-rbac.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c.Apply(t, rbac)

	dir := t.TempDir()
	caDir := filepath.Join(dir, "ca")
	if r := e2eutil.Run(t, binary, nil, "ca", "init", "--dir", caDir, "--trust-domain", "cluster.local"); r.Code != 0 {
		t.Fatalf("ca init: %d %s", r.Code, r.Stderr)
	}
	tokens := filepath.Join(dir, "tokens")
	write(t, tokens, "tok-server spiffe://cluster.local/ns/web/sa/server\ntok-client spiffe://cluster.local/ns/web/sa/client\n")
	write(t, filepath.Join(dir, "server.token"), "tok-server\n")
	write(t, filepath.Join(dir, "client.token"), "tok-client\n")

	caAddr, mirrorAddr := e2eutil.FreeAddr(t), e2eutil.FreeAddr(t)
	caProc := e2eutil.Start(t, binary, nil, "ca", "serve", "--dir", caDir, "--listen", caAddr, "--metrics", "",
		"--auth", "token", "--tokens", tokens,
		"--mirror-istio-config", "--mirror-listen", mirrorAddr, "--kubeconfig", caKubeconfig)

	identity := func(name string) []string {
		return []string{"--ca-addr", caAddr, "--ca-root", filepath.Join(caDir, "root-cert.pem"), "--token-file", filepath.Join(dir, name+".token")}
	}
	app := e2eutil.EchoApp(t)
	inbound := e2eutil.FreeAddr(t)
	server := e2eutil.NewSidecar(t)
	serverArgs := append([]string{"run", "--inbound-explicit", inbound + "=" + app,
		"--config-server", mirrorAddr, "--config-dir", filepath.Join(dir, "server-config"), "--namespace", "web"},
		append(identity("server"), server.Flags()...)...)
	serverProc := e2eutil.Start(t, binary, nil, serverArgs...)
	outbound := e2eutil.FreeAddr(t)
	client := e2eutil.NewSidecar(t)
	e2eutil.Start(t, binary, nil, append([]string{"run", "--outbound-explicit", outbound + "=" + inbound + "#spiffe://cluster.local/ns/web/sa/server",
		"--namespace", "web"}, append(identity("client"), client.Flags()...)...)...)
	server.WaitReady(t)
	client.WaitReady(t)

	// No policy yet: PERMISSIVE, so plaintext and mesh mTLS both reach the app.
	e2eutil.Eventually(t, "plaintext reaches the app under PERMISSIVE", enforceWithin, func() error { return echoes(inbound) })
	e2eutil.Eventually(t, "mesh mTLS reaches the app", enforceWithin, func() error { return echoes(outbound) })

	step := func(what string, apply func(), checks ...func() error) {
		t.Helper()
		apply()
		start := time.Now()
		e2eutil.Eventually(t, what, enforceWithin, func() error {
			for _, check := range checks {
				if err := check(); err != nil {
					return err
				}
			}
			return nil
		})
		t.Logf("%s: enforced %s after the API server accepted it", what, time.Since(start).Round(10*time.Millisecond))
	}

	step("PeerAuthentication STRICT refuses plaintext", func() {
		c.Apply(t, []byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: web\nspec:\n  mtls:\n    mode: STRICT\n"))
	}, func() error { return refused(inbound) })
	if err := echoes(outbound); err != nil {
		t.Fatalf("mesh mTLS refused under STRICT: %v", err)
	}

	step("AuthorizationPolicy DENY refuses the client's principal", func() {
		c.Apply(t, []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: web
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/web/sa/client"]
`))
	}, func() error { return refused(outbound) })

	step("deleting both restores PERMISSIVE and allows the client", func() {
		c.Delete(t, "security.istio.io/v1", "AuthorizationPolicy", "web", "deny-client")
		c.Delete(t, "security.istio.io/v1", "PeerAuthentication", "web", "strict")
	}, func() error { return echoes(inbound) }, func() error { return echoes(outbound) })

	// A policy of another namespace is not the server's business.
	c.Apply(t, []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: other\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: other\nspec:\n  mtls:\n    mode: STRICT\n"))
	step("a mesh-wide STRICT in the root namespace applies", func() {
		c.Apply(t, []byte("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n"))
	}, func() error { return refused(inbound) })
	written, err := os.ReadFile(filepath.Join(dir, "server-config", "istio-config-from-ca.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(written, []byte(`"namespace":"other"`)) {
		t.Errorf("the server sidecar received another namespace's policy:\n%s", written)
	}

	for name, p := range map[string]*e2eutil.Process{"ca": caProc, "server sidecar": serverProc} {
		select {
		case <-p.Done():
			t.Fatalf("%s exited: %v\n%s", name, p.Err(), p.Output)
		default:
		}
	}
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
