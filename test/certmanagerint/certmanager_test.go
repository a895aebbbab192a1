package certmanagerint

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/ca/catest"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

const (
	namespace = "istio-system"
	clientID  = "spiffe://cluster.local/ns/demo/sa/client"
	serverID  = "spiffe://cluster.local/ns/demo/sa/server"
)

// TestCertManagerSignsSidecarSVIDs: cert-manager's CA issuer signs, through
// `meshproxy ca serve --signer certmanager`, the CA's own serving
// certificate and two sidecars' SVIDs; the sidecars then talk mesh mTLS
// under STRICT, plaintext is refused, and no CertificateRequest is left.
func TestCertManagerSignsSidecarSVIDs(t *testing.T) {
	if testing.Short() {
		t.Skip("runs kube-apiserver, etcd and cert-manager; skipped with -short")
	}
	if bins.missing != "" {
		t.Skip("cannot run the cluster: " + bins.missing)
	}
	c := startCluster(t)
	for _, f := range []string{"cert-manager.io_certificaterequests.yaml", "cert-manager.io_issuers.yaml",
		"cert-manager.io_clusterissuers.yaml", "cert-manager.io_certificates.yaml",
		"acme.cert-manager.io_orders.yaml", "acme.cert-manager.io_challenges.yaml"} {
		c.applyYAMLFile(t, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", filepath.Join(bins.crds, f))
	}
	e2eutil.Eventually(t, "cert-manager CRDs served", 60*time.Second, func() error {
		code, body, err := c.do(http.MethodGet, "/apis/cert-manager.io/v1/namespaces/"+namespace+"/certificaterequests", nil)
		if err != nil || code != http.StatusOK {
			return fmt.Errorf("%d %v %s", code, err, body)
		}
		return nil
	})

	// The mesh CA: an intermediate under a root, in a CA issuer's secret.
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	keyDER, err := x509.MarshalECPrivateKey(pki.IntermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})
	c.create(t, "/api/v1/namespaces", map[string]any{"apiVersion": "v1", "kind": "Namespace", "metadata": map[string]any{"name": namespace}})
	c.create(t, "/api/v1/namespaces/"+namespace+"/secrets", map[string]any{
		"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
		"metadata": map[string]any{"name": "mesh-ca"},
		"data": map[string][]byte{
			"tls.crt": testpki.PEMCerts(pki.Intermediate, pki.Root),
			"tls.key": keyPEM,
			"ca.crt":  testpki.PEMCerts(pki.Root),
		},
	})
	c.create(t, "/apis/cert-manager.io/v1/namespaces/"+namespace+"/issuers", map[string]any{
		"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
		"metadata": map[string]any{"name": "mesh-ca"},
		"spec":     map[string]any{"ca": map[string]any{"secretName": "mesh-ca"}},
	})
	certManager := e2eutil.Start(t, bins.certManager, nil, "--kubeconfig", c.kubeconfig, "--cluster-resource-namespace", namespace)
	e2eutil.Eventually(t, "CA issuer ready", 120*time.Second, func() error {
		return c.ready("/apis/cert-manager.io/v1/namespaces/" + namespace + "/issuers/mesh-ca")
	})

	dir := t.TempDir()
	root := filepath.Join(dir, "root.pem")
	testpki.WriteFile(t, root, testpki.PEMCerts(pki.Root))
	tokens := filepath.Join(dir, "tokens")
	testpki.WriteFile(t, tokens, []byte("client-token "+clientID+"\nserver-token "+serverID+"\n"))
	testpki.WriteFile(t, filepath.Join(dir, "client.token"), []byte("client-token"))
	testpki.WriteFile(t, filepath.Join(dir, "server.token"), []byte("server-token"))
	caAddr := serveCA(t, c, tokens, root)

	app := e2eutil.EchoApp(t)
	in, out := e2eutil.FreeAddr(t), e2eutil.FreeAddr(t)
	ss, cs := e2eutil.NewSidecar(t), e2eutil.NewSidecar(t)
	caFlags := func(name, id string) []string {
		return []string{"--ca-addr", caAddr, "--ca-root", root, "--token-file", filepath.Join(dir, name+".token"), "--ca-spiffe-id", id}
	}
	e2eutil.Start(t, bins.meshproxy, nil, append(append([]string{"run", "--mode", "STRICT", "--inbound-explicit", in + "=" + app},
		caFlags("server", serverID)...), ss.Flags()...)...)
	e2eutil.Start(t, bins.meshproxy, nil, append(append([]string{"run", "--outbound-explicit", out + "=" + in + "#" + serverID},
		caFlags("client", clientID)...), cs.Flags()...)...)
	ss.WaitReady(t)
	cs.WaitReady(t)
	for side, want := range map[e2eutil.Sidecar]string{ss: serverID, cs: clientID} {
		id, err := side.Identity()
		if err != nil {
			t.Fatal(err)
		}
		if id.SPIFFEID != want {
			t.Fatalf("sidecar identity %s, want %s", id.SPIFFEID, want)
		}
		if b, _ := pem.Decode([]byte(id.BundlePEM)); b == nil || !bytes.Equal(b.Bytes, pki.Root.Raw) {
			t.Fatal("sidecar's trust bundle is not the cert-manager issuer's root")
		}
	}

	// Mesh mTLS under STRICT: the echo comes back through both sidecars.
	if got := echo(t, out, "hello through cert-manager"); got != "hello through cert-manager" {
		t.Fatalf("echo through the sidecars = %q", got)
	}
	// Plaintext straight to the STRICT inbound gets nothing back.
	if got := echo(t, in, "plaintext"); got != "" {
		t.Fatalf("STRICT inbound answered plaintext with %q", got)
	}

	c.noRequestsLeft(t)

	// Without cert-manager's approver, meshproxy approves its requests with
	// --certmanager-approve.
	certManager.Stop(t, 30*time.Second)
	e2eutil.Start(t, bins.certManager, nil, "--kubeconfig", c.kubeconfig, "--cluster-resource-namespace", namespace,
		"--controllers", "issuers,certificaterequests-issuer-ca")
	approving := serveCA(t, c, tokens, root, "--certmanager-approve")
	// A CSR that does not name the caller never reaches cert-manager.
	if _, err := catest.Create(t, approving, []*x509.Certificate{pki.Root}, "client-token"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("CSR without the caller's SPIFFE ID: %v, want InvalidArgument", err)
	}
	third := e2eutil.NewSidecar(t)
	e2eutil.Start(t, bins.meshproxy, nil, append(append([]string{"run", "--inbound-explicit", e2eutil.FreeAddr(t) + "=" + app},
		"--ca-addr", approving, "--ca-root", root, "--token-file", filepath.Join(dir, "client.token"), "--ca-spiffe-id", clientID), third.Flags()...)...)
	third.WaitReady(t)
	if id, err := third.Identity(); err != nil || id.SPIFFEID != clientID {
		t.Fatalf("sidecar of the approving CA: %+v, %v", id, err)
	}
	c.noRequestsLeft(t)
}

// serveCA runs `meshproxy ca serve --signer certmanager` with extra flags
// and returns its address once it serves a certificate from cert-manager.
func serveCA(t *testing.T, c *cluster, tokens, root string, extra ...string) string {
	t.Helper()
	addr := e2eutil.FreeAddr(t)
	proc := e2eutil.Start(t, bins.meshproxy, nil, append([]string{"ca", "serve", "--listen", addr, "--metrics", "",
		"--auth", "token", "--tokens", tokens,
		"--signer", "certmanager", "--certmanager-kubeconfig", c.kubeconfig, "--certmanager-namespace", namespace,
		"--certmanager-issuer", "mesh-ca", "--certmanager-root", root}, extra...)...)
	serving := regexp.MustCompile(`ca serving`)
	e2eutil.Eventually(t, "meshproxy CA serving with a certificate from cert-manager", 120*time.Second, func() error {
		select {
		case <-proc.Done():
			t.Fatalf("ca serve exited: %v\n%s", proc.Err(), proc.Output.String())
		default:
		}
		if !serving.MatchString(proc.Output.String()) {
			return fmt.Errorf("not serving yet")
		}
		conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	})
	return addr
}

// noRequestsLeft waits until the CA has deleted its CertificateRequests.
func (c *cluster) noRequestsLeft(t *testing.T) {
	t.Helper()
	e2eutil.Eventually(t, "CertificateRequests deleted", 30*time.Second, func() error {
		_, body, err := c.do(http.MethodGet, "/apis/cert-manager.io/v1/namespaces/"+namespace+"/certificaterequests", nil)
		if err != nil {
			return err
		}
		var list struct{ Items []json.RawMessage }
		if err := json.Unmarshal([]byte(body), &list); err != nil {
			return err
		}
		if n := len(list.Items); n != 0 {
			return fmt.Errorf("%d CertificateRequests left", n)
		}
		return nil
	})
}

// ready reports whether the object at path has condition Ready=True.
func (c *cluster) ready(path string) error {
	code, body, err := c.do(http.MethodGet, path, nil)
	if err != nil || code != http.StatusOK {
		return fmt.Errorf("%d %v %s", code, err, body)
	}
	var obj struct {
		Status struct {
			Conditions []struct{ Type, Status, Reason, Message string }
		}
	}
	if err := json.Unmarshal([]byte(body), &obj); err != nil {
		return err
	}
	for _, cd := range obj.Status.Conditions {
		if cd.Type == "Ready" {
			if cd.Status == "True" {
				return nil
			}
			return fmt.Errorf("Ready=%s %s: %s", cd.Status, cd.Reason, cd.Message)
		}
	}
	return fmt.Errorf("no Ready condition")
}

// echo sends msg to addr, half-closes and returns what came back (empty if
// the connection was closed or nothing came within 10 s).
func echo(t *testing.T, addr, msg string) string {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte(msg)); err != nil {
		return ""
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	got, _ := io.ReadAll(conn)
	return string(got)
}
