package netns_test

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// TestCapturedTLSMatchesDestinationRuleBySNI runs a real sidecar behind
// nftables capture in pod A with a DestinationRule for *.example.com
// (maxConnections 1). The app's own TLS to a service outside the mesh (pod
// B's other address, outside --mesh-cidrs) is matched by its server name:
// a second connection named *.example.com is refused while the first is
// open, one named otherwise is not limited, and the bytes reach the
// service untouched (the app's TLS end to end).
func TestCapturedTLSMatchesDestinationRuleBySNI(t *testing.T) {
	a, b := netns.NewPair(t)
	external := testpki.New(t, "external.example")
	leaf := external.IssueLeaf(t, testpki.Leaf{DNSNames: []string{"db.example.com", "db.example.org"}})
	const port = 8443
	var ln net.Listener
	if err := b.Do(func() (err error) {
		ln, err = tls.Listen("tcp", hp(netns.OtherV4, port), &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(leaf)}, MinVersion: tls.VersionTLS12})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	e2eutil.ServeEcho(t, ln)

	if out, err := meshproxy(t, a, "redirect", "install", "--mode", string(redirect.ModeNftables)); err != nil {
		t.Fatalf("redirect install: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = meshproxy(t, a, "redirect", "uninstall", "--mode", string(redirect.ModeNftables)) })
	cfg := t.TempDir()
	rule := `apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: example
  namespace: default
spec:
  host: "*.example.com"
  trafficPolicy:
    tls:
      mode: DISABLE
    connectionPool:
      tcp:
        maxConnections: 1
`
	if err := os.WriteFile(filepath.Join(cfg, "dr.yaml"), []byte(rule), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfg, 0o755); err != nil {
		t.Fatal(err)
	}
	ca := testpki.New(t, "cluster.local")
	startSidecarAs(t, a, proxyUser, "PERMISSIVE", identityFiles(t, ca, clientID),
		"--config-dir", cfg, "--mesh-cidrs", "198.18.0.0/16,fd00:198::/32")

	roots := x509.NewCertPool()
	roots.AddCert(external.Root)
	to := hp(netns.OtherV4, port)
	appTLS := func(sni string) (*tls.Conn, error) {
		var raw net.Conn
		if err := a.Do(func() (err error) { // a socket of pod A, as root: captured
			raw, err = net.DialTimeout("tcp", to, 10*time.Second)
			return err
		}); err != nil {
			return nil, err
		}
		_ = raw.SetDeadline(time.Now().Add(20 * time.Second))
		c := tls.Client(raw, &tls.Config{RootCAs: roots, ServerName: sni})
		if _, err := fmt.Fprintf(c, "hello %s\n", sni); err != nil {
			c.Close()
			return nil, err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil || line != "hello "+sni+"\n" {
			c.Close()
			return nil, fmt.Errorf("echo %q, %v", line, err)
		}
		return c, nil
	}

	first, err := appTLS("db.example.com")
	if err != nil {
		t.Fatalf("the app's own TLS to db.example.com through the sidecar: %v", err)
	}
	defer first.Close()
	if c, err := appTLS("db.example.com"); err == nil {
		c.Close()
		t.Fatal("a second connection named *.example.com got through the rule's maxConnections: 1")
	}
	other, err := appTLS("db.example.org")
	if err != nil {
		t.Fatalf("a name no rule matches is not limited: %v", err)
	}
	other.Close()
	code, body, err := a.HTTPGet("127.0.0.1:15020", "/metrics")
	if err != nil || code != 200 {
		t.Fatalf("metrics: %d %v", code, err)
	}
	const refused = `meshproxy_connections_total{decision="connection_pool_full",direction="outbound",mode="unknown"} 1`
	if !strings.Contains(body, refused+"\n") {
		t.Fatalf("metrics lack %s", refused)
	}
}
