package e2e

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/istiogolden"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// TestIstioTCPSemanticsThroughSidecars runs Istio's own TCP authorization
// inputs (testdata/istio/golden-tcp.json) through a real sidecar: each
// connection (peer identity or plaintext, source address, port) must be
// allowed or refused exactly as Istio does.
func TestIstioTCPSemanticsThroughSidecars(t *testing.T) {
	cases, err := istiogolden.Load(filepath.Join("..", "..", "testdata", "istio"))
	if err != nil {
		t.Fatal(err)
	}
	pki := testpki.New(t, "cluster.local")
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			// One echo app per Istio port; the policy's ports are mapped
			// onto the apps' real ports (the sidecar authorizes on those).
			real := map[uint16]string{}
			var ports []uint16
			for _, k := range c.Connections {
				if _, ok := real[k.Port]; !ok {
					real[k.Port] = echoApp(t)
					ports = append(ports, k.Port)
				}
			}
			doc := string(c.YAML)
			sort.Slice(ports, func(i, j int) bool { return ports[i] > ports[j] })
			listeners := map[uint16]string{}
			dir := t.TempDir()
			args := []string{"run", "--namespace", c.Namespace, "--config-dir", dir, "--labels-file", labelsFile(t, c.Labels)}
			for _, p := range ports {
				_, appPort, _ := net.SplitHostPort(real[p])
				doc = strings.ReplaceAll(doc, strconv.Quote(strconv.Itoa(int(p))), strconv.Quote(appPort))
				listeners[p] = freeAddr(t)
				args = append(args, "--inbound-explicit", listeners[p]+"="+real[p])
			}
			writeFile(t, filepath.Join(dir, "policy.yaml"), doc)
			a := newSidecarAddrs(t)
			start(t, append(append(args, a.flags()...), fileIdentity(t, pki, "spiffe://cluster.local/ns/"+c.Namespace+"/sa/httpbin")...)...)
			a.waitReady(t)
			for _, k := range c.Connections {
				err := echoThrough(t, pki, listeners[k.Port], k.SourceIP(), k.Peer)
				if (err == nil) != k.Allowed {
					t.Errorf("%+v: echo error %v; Istio: allowed=%v", k, err, k.Allowed)
				}
			}
			if c.Result == "rejected" {
				code, body, err := httpGet("http://" + a.admin + "/config")
				if err != nil || code != http.StatusOK || !strings.Contains(strings.ReplaceAll(body, " ", ""), `"result":"rejected"`) {
					t.Errorf("GET /config does not list the rejection: %d %v %s", code, err, body)
				}
			}
		})
	}
}

// TestDryRunThroughSidecarChangesNothingAndIsCounted: Istio's dry-run-mix
// input on a real sidecar; the dry-run ALLOW on port 80 neither allows nor
// refuses, and every evaluation is counted.
func TestDryRunThroughSidecarChangesNothingAndIsCounted(t *testing.T) {
	pki := testpki.New(t, "cluster.local")
	app := echoApp(t)
	_, appPort, _ := net.SplitHostPort(app)
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "policy.yaml"), `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-deny
  namespace: foo
  annotations:
    "istio.io/dry-run": "true"
spec:
  action: DENY
  rules:
  - to:
    - operation:
        ports: ["`+appPort+`"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-allow
  namespace: foo
  annotations:
    "istio.io/dry-run": "true"
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["nobody"]
`)
	in := freeAddr(t)
	a := newSidecarAddrs(t)
	start(t, append(append([]string{"run", "--namespace", "foo", "--config-dir", dir, "--inbound-explicit", in + "=" + app}, a.flags()...),
		fileIdentity(t, pki, "spiffe://cluster.local/ns/foo/sa/httpbin")...)...)
	a.waitReady(t)
	for range 3 {
		if err := echoThrough(t, pki, in, "127.0.0.1", "spiffe://cluster.local/ns/ns-1/sa/client"); err != nil {
			t.Fatalf("a dry-run policy refused a connection: %v", err)
		}
	}
	for _, c := range []struct{ policy, result string }{{"foo/dry-deny", "deny"}, {"foo/dry-allow", "deny"}} {
		eventually(t, "dry-run counted for "+c.policy, func() error {
			v, err := a.sidecar().Metric("meshproxy_authz_dry_run_total", "policy", c.policy, "result", c.result)
			if err == nil && v != 3 {
				err = fmt.Errorf("counted %v, want 3", v)
			}
			return err
		})
	}
	if v, err := a.sidecar().Metric("meshproxy_config_documents", "kind", "AuthorizationPolicy", "result", "dry_run"); err != nil || v != 2 {
		t.Errorf("config_documents{dry_run} = %v, %v; want 2", v, err)
	}
}

func labelsFile(t *testing.T, labels map[string]string) string {
	t.Helper()
	var b strings.Builder
	for k, v := range labels {
		fmt.Fprintf(&b, "%s=%q\n", k, v)
	}
	p := filepath.Join(t.TempDir(), "labels")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// echoThrough connects to addr from source (a loopback address) as peer
// (mesh mTLS with an SVID for it, or plaintext for ""), sends a line and
// returns nil once it is echoed back; a refusal is an error.
func echoThrough(t *testing.T, pki *testpki.CA, addr, source, peer string) error {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(10 * time.Second))
	c := raw
	if peer != "" {
		tc := tls.Client(raw, &tls.Config{
			Certificates: []tls.Certificate{testpki.TLSCertificate(pki.Issue(t, peer, time.Hour))},
			NextProtos:   []string{"istio"},
			MinVersion:   tls.VersionTLS13,
			// The server is the sidecar under test; its identity is not what
			// this test checks, its policy is.
			InsecureSkipVerify: true, //nolint:gosec // see above
		})
		if err := tc.Handshake(); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
		c = tc
	}
	const msg = "istio tcp golden\n"
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo mismatch")
	}
	return nil
}
