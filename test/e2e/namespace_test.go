package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
)

// A workload whose SVID is spiffe://TD/ns/shop/sa/web takes namespace shop
// without --namespace: the STRICT PeerAuthentication of namespace shop in
// --config-dir applies (plaintext is refused), and a policy of a namespace
// that can never select it is reported at load.
func TestNamespaceDefaultsToTheSVIDs(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	dir := t.TempDir()
	const docs = `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: shop-strict
  namespace: shop
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: elsewhere
  namespace: billing
spec:
  action: DENY
  rules:
  - {}
`
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(docs), 0o644); err != nil {
		t.Fatal(err)
	}
	in := freeAddr(t)
	a := newSidecarAddrs(t)
	p := start(t, append(append([]string{"run", "--inbound-explicit", in + "=" + echoApp(t), "--config-dir", dir},
		fileIdentity(t, pki, "spiffe://cluster.local/ns/shop/sa/web")...), a.flags()...)...)
	a.waitReady(t)
	eventually(t, "the shop policy in force", func() error {
		if err := plaintextEcho(in); err == nil {
			return fmt.Errorf("plaintext was echoed: the STRICT PeerAuthentication of namespace shop is not applied")
		}
		return nil
	})
	eventually(t, "a warning about the billing policy", func() error {
		for _, line := range p.Output.Lines() {
			if strings.Contains(line, "policy can never apply to this workload") && strings.Contains(line, "billing/elsewhere") {
				return nil
			}
		}
		return fmt.Errorf("no warning naming billing/elsewhere in:\n%s", p.Output.String())
	})
}

// plaintextEcho sends a line in plaintext through addr and expects it back.
func plaintextEcho(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return err
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if got != "hello\n" {
		return fmt.Errorf("echo %q", got)
	}
	return nil
}
