package federation

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// bin is the meshproxy binary built once for the package.
var bin string

func TestMain(m *testing.M) { e2eutil.Main(m, "federation", &bin) }

// domain is one trust domain: its CA directory, the running CA and its
// bundle endpoint.
type domain struct {
	td, dir      string
	caAddr       string
	bundleAddr   string
	metricsAddr  string
	tokenFile    string
	process      *e2eutil.Process
	endpointSpec string // --federate-with value for this domain
}

// startDomain runs `ca init` and `ca serve --bundle-endpoint` for td; id is
// the identity its token stands for.
func startDomain(t *testing.T, base, td, id string) *domain {
	t.Helper()
	d := &domain{td: td, dir: filepath.Join(base, td), caAddr: e2eutil.FreeAddr(t), bundleAddr: e2eutil.FreeAddr(t), metricsAddr: e2eutil.FreeAddr(t)}
	if r := e2eutil.Run(t, bin, nil, "ca", "init", "--dir", d.dir, "--trust-domain", td); r.Code != 0 {
		t.Fatalf("ca init %s: %d %s", td, r.Code, r.Stderr)
	}
	tokens := filepath.Join(base, td+".tokens")
	d.tokenFile = filepath.Join(base, td+".token")
	writeFile(t, tokens, "tok-"+td+" "+id+"\n")
	writeFile(t, d.tokenFile, "tok-"+td+"\n")
	d.process = e2eutil.Start(t, bin, nil, "ca", "serve", "--dir", d.dir, "--listen", d.caAddr, "--auth", "token", "--tokens", tokens,
		"--metrics", d.metricsAddr, "--bundle-endpoint", d.bundleAddr, "--bundle-refresh-hint", "1s")
	// https_spiffe with the meshproxy CA's default endpoint ID, bootstrapped
	// from a copy of its root-cert.pem taken now.
	bootstrap := filepath.Join(base, td+"-bootstrap.pem")
	data, err := os.ReadFile(filepath.Join(d.dir, "root-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, bootstrap, string(data))
	d.endpointSpec = td + "=https://" + d.bundleAddr + "/@" + bootstrap
	return d
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// echoThrough sends msg through a plaintext connection to addr and expects
// it back.
func echoThrough(addr, msg string) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	_ = c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil {
		return err
	}
	if string(got) != msg {
		return fmt.Errorf("got %q back, want %q", got, msg)
	}
	return nil
}

// identity reads a sidecar's full GET /identity.
func identity(s e2eutil.Sidecar) (admin.Identity, error) {
	code, body, err := e2eutil.HTTPGet("http://" + s.Admin + "/identity")
	if err != nil {
		return admin.Identity{}, err
	}
	if code != http.StatusOK {
		return admin.Identity{}, fmt.Errorf("/identity: %d %s", code, body)
	}
	var id admin.Identity
	return id, json.Unmarshal([]byte(body), &id)
}

// rootsOf counts the roots in a sidecar's bundle that belong to td (the
// meshproxy CA puts spiffe://TD in its roots).
func rootsOf(s e2eutil.Sidecar, td string) (int, error) {
	id, err := identity(s)
	if err != nil {
		return 0, err
	}
	certs, err := tlsmgr.ParseCertificatesPEM([]byte(id.BundlePEM))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, c := range certs {
		if hasURI(c, "spiffe://"+td) {
			n++
		}
	}
	return n, nil
}

func hasURI(c *x509.Certificate, uri string) bool {
	for _, u := range c.URIs {
		if u.String() == uri {
			return true
		}
	}
	return false
}

func authorizationPolicy(from string) string {
	return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: partners
  namespace: web
spec:
  rules:
  - from:
    - source:
` + from
}

const (
	clientID = "spiffe://a.test/ns/shop/sa/client"
	serverID = "spiffe://b.test/ns/web/sa/server"
)

func TestFederationCrossDomainMTLSFollowsAuthorizationPolicy(t *testing.T) {
	base := t.TempDir()
	a := startDomain(t, base, "a.test", clientID)
	b := startDomain(t, base, "b.test", serverID)
	app := e2eutil.EchoApp(t)
	policyDir := filepath.Join(base, "policy")
	if err := os.MkdirAll(policyDir, 0o700); err != nil {
		t.Fatal(err)
	}

	// The server sidecar in b.test trusts a.test; the client sidecar in
	// a.test trusts b.test (with the endpoint SPIFFE ID spelled out).
	inB, outA := e2eutil.FreeAddr(t), e2eutil.FreeAddr(t)
	server, client := e2eutil.NewSidecar(t), e2eutil.NewSidecar(t)
	serverProc := e2eutil.Start(t, bin, nil, append([]string{"run",
		"--ca-addr", b.caAddr, "--ca-root", filepath.Join(b.dir, "root-cert.pem"), "--token-file", b.tokenFile,
		"--inbound-explicit", inB + "=" + app, "--mode", "STRICT", "--config-dir", policyDir, "--namespace", "web",
		"--federate-with", a.endpointSpec}, server.Flags()...)...)
	bootB := strings.TrimPrefix(b.endpointSpec[strings.LastIndex(b.endpointSpec, "@"):], "@")
	e2eutil.Start(t, bin, nil, append([]string{"run",
		"--ca-addr", a.caAddr, "--ca-root", filepath.Join(a.dir, "root-cert.pem"), "--token-file", a.tokenFile,
		"--outbound-explicit", outA + "=" + inB + "#" + serverID,
		"--federate-with", "b.test=https://" + b.bundleAddr + "/#spiffe://b.test/ns/istio-system/sa/meshproxy-ca@" + bootB},
		client.Flags()...)...)
	server.WaitReady(t)
	client.WaitReady(t)
	for _, s := range []struct {
		side e2eutil.Sidecar
		td   string
	}{{server, "a.test"}, {client, "b.test"}} {
		e2eutil.Eventually(t, "bundle of "+s.td+" fetched from its endpoint", 30*time.Second, func() error {
			n, err := s.side.Metric("meshproxy_federation_bundle_fetches_total", "trust_domain", s.td, "result", "success")
			if err != nil {
				return err
			}
			if n < 1 {
				return errors.New("no successful fetch yet")
			}
			return nil
		})
	}

	// No AuthorizationPolicy: the foreign client is refused at the inbound
	// authorization, with its own reason, counted and logged.
	if err := echoThrough(outA, "hello from a.test\n"); err == nil {
		t.Fatal("a foreign peer got through without a policy naming its trust domain")
	}
	e2eutil.Eventually(t, "refusal counted as foreign_trust_domain", 20*time.Second, func() error {
		n, err := server.Metric("meshproxy_policy_denials_total", "reason", "foreign_trust_domain")
		if err != nil {
			return err
		}
		if n < 1 {
			return errors.New("not counted")
		}
		if out := serverProc.Output.String(); !strings.Contains(out, "reason=foreign_trust_domain") || !strings.Contains(out, "peer="+clientID) {
			return errors.New("refusal not logged with reason and peer")
		}
		return nil
	})

	// A policy that lets in any principal or the namespace, but does not
	// name a.test, still refuses it.
	writeFile(t, filepath.Join(policyDir, "authz.yaml"), authorizationPolicy("        principals: [\"*\"]\n        namespaces: [shop]\n"))
	e2eutil.Eventually(t, "policy loaded", 30*time.Second, func() error {
		code, body, err := e2eutil.HTTPGet("http://" + server.Admin + "/config")
		if err != nil || code != http.StatusOK || !strings.Contains(body, "web/partners") {
			return fmt.Errorf("policy not in force yet: %d %v", code, err)
		}
		return nil
	})
	before, err := server.Metric("meshproxy_policy_denials_total", "reason", "foreign_trust_domain")
	if err != nil {
		t.Fatal(err)
	}
	if err := echoThrough(outA, "hello again\n"); err == nil {
		t.Fatal("a policy that does not name a.test let its peer in")
	}
	e2eutil.Eventually(t, "second refusal counted", 20*time.Second, func() error {
		if n, err := server.Metric("meshproxy_policy_denials_total", "reason", "foreign_trust_domain"); err != nil || n <= before {
			return fmt.Errorf("count %v, %v", n, err)
		}
		return nil
	})

	// A policy naming a.test lets it in: cross-domain mTLS end to end.
	writeFile(t, filepath.Join(policyDir, "authz.yaml"), authorizationPolicy("        principals: [\"a.test/ns/shop/sa/client\"]\n"))
	e2eutil.Eventually(t, "cross-domain mTLS allowed by the policy naming a.test", 30*time.Second, func() error {
		return echoThrough(outA, "hello from a.test\n")
	})

	// a.test adds a root: b.test's sidecar learns it from the bundle
	// endpoint at the refresh hint.
	if r := e2eutil.Run(t, bin, nil, "ca", "rotate-root", "--dir", a.dir, "--phase", "add"); r.Code != 0 {
		t.Fatalf("rotate-root add: %d %s", r.Code, r.Stderr)
	}
	e2eutil.Eventually(t, "the server sidecar trusts both roots of a.test", 30*time.Second, func() error {
		n, err := rootsOf(server, "a.test")
		if err != nil {
			return err
		}
		if n != 2 {
			return fmt.Errorf("%d roots of a.test", n)
		}
		return nil
	})

	// a.test's bundle endpoint goes away: fetches fail, the last bundle
	// stays, and cross-domain traffic goes on.
	a.process.Kill(t)
	e2eutil.Eventually(t, "failed fetches counted", 30*time.Second, func() error {
		n, err := server.Metric("meshproxy_federation_bundle_fetches_total", "trust_domain", "a.test", "result", "failure")
		if err != nil {
			return err
		}
		if n < 1 {
			return errors.New("no failure counted yet")
		}
		return nil
	})
	if n, err := rootsOf(server, "a.test"); err != nil || n != 2 {
		t.Fatalf("after failed fetches the server sidecar holds %d roots of a.test (%v), want the last bundle's 2", n, err)
	}
	if err := echoThrough(outA, "still federated\n"); err != nil {
		t.Fatalf("cross-domain traffic after the bundle endpoint went away: %v", err)
	}
}

func TestFederationUsageErrorsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "nope.pem")
	tests := []struct {
		name string
		spec string
		code int
		want string
	}{
		{"not TD=URL", "https://b.test/", 2, "--federate-with"},
		{"http url", "b.test=http://127.0.0.1:1/", 2, "want https://"},
		{"id outside the trust domain", "b.test=https://127.0.0.1:1/#spiffe://c.test/x@" + bad, 2, "not in trust domain"},
		{"missing bootstrap file", "b.test=https://127.0.0.1:1/@" + bad, 1, bad},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := e2eutil.Run(t, bin, nil, "run", "--cert-file", "x", "--key-file", "y", "--bundle-file", "z",
				"--inbound-explicit", "127.0.0.1:0=127.0.0.1:1", "--admin", "off", "--health", "off", "--metrics", "off",
				"--federate-with", tc.spec)
			if tc.code == 1 {
				// The identity files are checked first; give real ones.
				r = e2eutil.Run(t, bin, nil, "run", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1",
					"--admin", "off", "--health", "off", "--metrics", "off", "--federate-with", tc.spec,
					"--ca-addr", "127.0.0.1:1", "--ca-root", writeRoot(t, dir), "--token-file", writeToken(t, dir))
			}
			if r.Code != tc.code || !strings.Contains(r.Stderr, tc.want) {
				t.Fatalf("exit %d, want %d; stderr %q should contain %q", r.Code, tc.code, r.Stderr, tc.want)
			}
		})
	}
}

// writeRoot writes a root from a fresh `ca init` and returns its path.
func writeRoot(t *testing.T, dir string) string {
	t.Helper()
	caDir := filepath.Join(dir, "ca")
	if _, err := os.Stat(caDir); err != nil {
		if r := e2eutil.Run(t, bin, nil, "ca", "init", "--dir", caDir, "--trust-domain", "a.test"); r.Code != 0 {
			t.Fatalf("ca init: %s", r.Stderr)
		}
	}
	return filepath.Join(caDir, "root-cert.pem")
}

func writeToken(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "token")
	writeFile(t, p, "tok\n")
	return p
}
