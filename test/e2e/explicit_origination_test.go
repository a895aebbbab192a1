package e2e

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/dnstest"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TestExplicitOutboundOriginatesTLSPerDestinationRule runs a real sidecar
// whose --outbound-explicit destination is an external TLS service by name
// (localhost) and a DestinationRule for that host with tls.mode SIMPLE and
// connectionPool.tcp.maxConnections 1: the app's plaintext reaches the
// service over TLS the sidecar originates (SNI and name check: the host,
// as the rule sets no sni), and a second app connection while the first is
// open is refused and counted. The rule's short host is resolved in the
// SVID's namespace (localhost.demo) through --dns-server, a DNS server the
// test runs: that name, and no other, is asked of it, and none leaves the
// machine.
func TestExplicitOutboundOriginatesTLSPerDestinationRule(t *testing.T) {
	mesh := testpki.New(t, "cluster.local")
	external := testpki.New(t, "external.example")
	dir := t.TempDir()
	caFile := filepath.Join(dir, "external-ca.pem")
	testpki.WriteFile(t, caFile, testpki.PEMCerts(external.Root))
	port := externalTLSEcho(t, external, "localhost")
	cfgDir := t.TempDir()
	rule := fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: external-db
spec:
  host: localhost
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
        connectTimeout: 2s
    tls:
      mode: SIMPLE
      caCertificates: %s
`, caFile)
	if err := os.WriteFile(filepath.Join(cfgDir, "dr.yaml"), []byte(rule), 0o644); err != nil {
		t.Fatal(err)
	}
	dns := dnstest.Start(t, map[string][]netip.Addr{"localhost.demo": {netip.MustParseAddr("127.0.0.1")}})
	out := freeAddr(t)
	sc := newSidecarAddrs(t)
	start(t, append(append([]string{"run", "--config-dir", cfgDir, "--dns-server", dns.Addr(),
		"--outbound-explicit", out + "=localhost:" + strconv.Itoa(port)}, fileIdentity(t, mesh, clientID)...), sc.flags()...)...)
	sc.waitReady(t)

	first := roundTripLine(t, out, "through TLS\n")
	defer first.Close()
	second, err := net.DialTimeout("tcp", out, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	_ = second.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = second.Write([]byte("over the limit\n"))
	if got, err := bufio.NewReader(second).ReadString('\n'); err == nil {
		t.Fatalf("a second app connection got through maxConnections: 1 (read %q)", got)
	}
	if got := dns.Asked(); !slices.Equal(got, []string{"localhost.demo"}) {
		t.Errorf("names asked of --dns-server: %q, want the rule's host in the SVID's namespace only, [localhost.demo]", got)
	}
	var cfg struct {
		Policy struct {
			Resolved map[string][]string `json:"resolved_hosts"`
		} `json:"policy"`
	}
	if code, body, err := httpGet("http://" + sc.admin + "/config"); err != nil || code != http.StatusOK || json.Unmarshal([]byte(body), &cfg) != nil ||
		!slices.Equal(cfg.Policy.Resolved["localhost.demo"], []string{"127.0.0.1"}) {
		t.Errorf("GET /config resolved_hosts: want localhost.demo [127.0.0.1] from --dns-server; got %d %v %s", code, err, body)
	}
	metrics := "http://" + sc.metrics + "/metrics"
	for _, m := range []struct{ mode, decision string }{{"tls_origination", "allow"}, {"unknown", "connection_pool_full"}} {
		eventually(t, "counted "+m.mode+" "+m.decision, func() error {
			n, err := e2eutil.Metric(metrics, "meshproxy_connections_total", "direction", "outbound", "mode", m.mode, "decision", m.decision)
			if err == nil && n < 1 {
				err = fmt.Errorf("%v", n)
			}
			return err
		})
	}
}

// roundTripLine opens a connection to addr, sends msg and expects it back.
func roundTripLine(t *testing.T, addr, msg string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if got, err := bufio.NewReader(c).ReadString('\n'); err != nil || got != msg {
		t.Fatalf("round trip through %s: got %q, %v; want %q", addr, got, err, msg)
	}
	return c
}

// externalTLSEcho is a TLS echo server outside the mesh, with a server
// certificate for dnsName from ca; it returns its port.
func externalTLSEcho(t *testing.T, ca *testpki.CA, dnsName string) int {
	t.Helper()
	leaf := ca.IssueLeaf(t, testpki.Leaf{DNSNames: []string{dnsName}})
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{testpki.TLSCertificate(leaf)}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	e2eutil.ServeEcho(t, ln)
	return ln.Addr().(*net.TCPAddr).Port
}
