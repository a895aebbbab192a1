package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/internal/testtools"
)

// Version is the Kubernetes release the tests run against.
const Version = "v1.37.2"

// BinDir is where the Kubernetes binaries are expected: what
// test/cluster/tools/build.sh builds into the test tools' cache.
func BinDir() string {
	return filepath.Join(testtools.CacheDir(), "k8s-"+Version, "bin")
}

// Cluster is a running etcd + kube-apiserver.
type Cluster struct {
	// Server is the API server's https URL.
	Server string
	// Admin is a client with the system:masters group.
	Admin *authn.KubeAPI
	// AdminKubeconfig is a kubeconfig file for Admin.
	AdminKubeconfig string

	dir   string
	caPEM []byte
}

// Start runs etcd and kube-apiserver until the test ends. It skips the test
// when kube-apiserver or etcd is not installed, naming what is missing.
func Start(t testing.TB) *Cluster {
	t.Helper()
	apiserver := filepath.Join(BinDir(), "kube-apiserver")
	if _, err := os.Stat(apiserver); err != nil {
		t.Skipf("kube-apiserver %s not built (test/cluster/tools/build.sh builds it): %v", Version, err)
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		t.Skipf("etcd not installed (apt-get install etcd-server): %v", err)
	}
	dir := t.TempDir()
	c := &Cluster{dir: dir}

	etcdClient, etcdPeer := e2eutil.FreeAddr(t), e2eutil.FreeAddr(t)
	e2eutil.Start(t, etcd, nil,
		"--name", "kubetest", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", "http://"+etcdClient, "--advertise-client-urls", "http://"+etcdClient,
		"--listen-peer-urls", "http://"+etcdPeer, "--initial-advertise-peer-urls", "http://"+etcdPeer,
		"--initial-cluster", "kubetest=http://"+etcdPeer, "--log-level", "warn")

	// Client CA and the admin's certificate; service account signing key.
	caKey, caCert := newCA(t)
	write(t, filepath.Join(dir, "client-ca.crt"), pemBlock("CERTIFICATE", caCert.Raw))
	adminCert, adminKey := issueClient(t, caKey, caCert, "kubetest-admin", "system:masters")
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	saDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "sa.key"), pemBlock("PRIVATE KEY", saDER))
	write(t, filepath.Join(dir, "sa.pub"), pemBlock("PUBLIC KEY", pubDER))

	apiAddr := e2eutil.FreeAddr(t)
	host, port, _ := net.SplitHostPort(apiAddr)
	certDir := filepath.Join(dir, "apiserver")
	e2eutil.Start(t, apiserver, nil,
		"--etcd-servers", "http://"+etcdClient,
		"--bind-address", host, "--advertise-address", host, "--secure-port", port,
		"--cert-dir", certDir,
		"--client-ca-file", filepath.Join(dir, "client-ca.crt"),
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file", filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range", "10.96.0.0/24",
		"--enable-priority-and-fairness=false",
		"--disable-admission-plugins", "ServiceAccount",
		"--watch-cache=true",
		// Loopback cannot be the kubernetes Service endpoint; nothing needs it here.
		"--endpoint-reconciler-type", "none",
		"--v", "0")
	c.Server = "https://" + apiAddr

	// kube-apiserver writes a self-signed serving certificate (with its
	// CA) into --cert-dir when it starts.
	crt := filepath.Join(certDir, "apiserver.crt")
	e2eutil.Eventually(t, "kube-apiserver serving certificate", 60*time.Second, func() error {
		b, err := os.ReadFile(crt)
		if err == nil && bytes.Contains(b, []byte("END CERTIFICATE")) {
			c.caPEM = b
		}
		return err
	})
	c.AdminKubeconfig = c.writeKubeconfig(t, "admin", map[string]string{
		"client-certificate-data": b64(pemBlock("CERTIFICATE", adminCert.Raw)),
		"client-key-data":         b64(adminKey),
	})
	if c.Admin, err = authn.KubeconfigAPI(c.AdminKubeconfig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Admin.CloseIdleConnections)
	// A list that reaches etcd, rather than /readyz: its etcd check wants
	// endpoints that older etcd releases (Debian's 3.4) lack.
	e2eutil.Eventually(t, "kube-apiserver serving", 120*time.Second, func() error {
		_, err := c.do(http.MethodGet, "/api/v1/namespaces?limit=1", nil)
		return err
	})
	return c
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// writeKubeconfig writes a kubeconfig for this cluster with the given user fields.
func (c *Cluster) writeKubeconfig(t testing.TB, name string, user map[string]string) string {
	t.Helper()
	kc := map[string]any{
		"apiVersion":      "v1",
		"kind":            "Config",
		"current-context": name,
		"clusters":        []any{map[string]any{"name": "kubetest", "cluster": map[string]any{"server": c.Server, "certificate-authority-data": b64(c.caPEM)}}},
		"users":           []any{map[string]any{"name": name, "user": user}},
		"contexts":        []any{map[string]any{"name": name, "context": map[string]any{"cluster": "kubetest", "user": name}}},
	}
	b, err := yaml.Marshal(kc)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(c.dir, name+".kubeconfig")
	write(t, path, b)
	return path
}

// do sends an admin request; a non-2xx answer is an error with the body.
func (c *Cluster) do(method, path string, body []byte) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Admin.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return b, &StatusError{Code: resp.StatusCode, Body: string(b)}
	}
	return b, nil
}

// StatusError is a non-2xx answer of the API server.
type StatusError struct {
	Code int
	Body string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("API server answered %d: %s", e.Code, e.Body)
}

// Do sends an admin request to path and returns the body of a 2xx answer.
func (c *Cluster) Do(t testing.TB, method, path string, body []byte) []byte {
	t.Helper()
	b, err := c.do(method, path, body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return b
}

// resources maps the kinds tests create to their collection paths:
// {ns} is replaced by the object's namespace.
var resources = map[string]string{
	"v1/Namespace":      "/api/v1/namespaces",
	"v1/ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
	"rbac.authorization.k8s.io/v1/ClusterRole":         "/apis/rbac.authorization.k8s.io/v1/clusterroles",
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding":  "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
	"apiextensions.k8s.io/v1/CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
	"security.istio.io/v1/PeerAuthentication":          "/apis/security.istio.io/v1/namespaces/{ns}/peerauthentications",
	"security.istio.io/v1/AuthorizationPolicy":         "/apis/security.istio.io/v1/namespaces/{ns}/authorizationpolicies",
	"networking.istio.io/v1/DestinationRule":           "/apis/networking.istio.io/v1/namespaces/{ns}/destinationrules",
	"networking.istio.io/v1/Gateway":                   "/apis/networking.istio.io/v1/namespaces/{ns}/gateways",
	"networking.istio.io/v1/VirtualService":            "/apis/networking.istio.io/v1/namespaces/{ns}/virtualservices",
}

// ObjectPath is the URL path of a named object of apiVersion/kind.
func ObjectPath(apiVersion, kind, namespace, name string) (string, error) {
	coll, ok := resources[apiVersion+"/"+kind]
	if !ok {
		return "", fmt.Errorf("kubetest: no path known for %s %s", apiVersion, kind)
	}
	if strings.Contains(coll, "{ns}") {
		if namespace == "" {
			namespace = "default"
		}
		coll = strings.ReplaceAll(coll, "{ns}", namespace)
	}
	return coll + "/" + name, nil
}

// Apply creates or replaces every object of the YAML stream, as
// `kubectl apply` would for these kinds.
func (c *Cluster) Apply(t testing.TB, yamlDocs []byte) {
	t.Helper()
	docs, errs := manifest.Documents([]manifest.File{{Name: "apply", Data: yamlDocs}})
	if len(errs) > 0 {
		t.Fatalf("apply: %v", errors.Join(errs...))
	}
	for _, d := range docs {
		c.applyJSON(t, d.JSON)
	}
}

func (c *Cluster) applyJSON(t testing.TB, obj []byte) {
	t.Helper()
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(obj, &head); err != nil {
		t.Fatalf("apply: %v", err)
	}
	path, err := ObjectPath(head.APIVersion, head.Kind, head.Metadata.Namespace, head.Metadata.Name)
	if err != nil {
		t.Fatal(err)
	}
	collection := path[:strings.LastIndex(path, "/")]
	_, err = c.do(http.MethodPost, collection, obj)
	var se *StatusError
	if errors.As(err, &se) && se.Code == http.StatusConflict {
		// Exists: replace it, carrying its resourceVersion.
		cur := c.Do(t, http.MethodGet, path, nil)
		var m struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(cur, &m); err != nil {
			t.Fatal(err)
		}
		var o map[string]any
		if err := json.Unmarshal(obj, &o); err != nil {
			t.Fatal(err)
		}
		o["metadata"].(map[string]any)["resourceVersion"] = m.Metadata.ResourceVersion
		b, _ := json.Marshal(o)
		_, err = c.do(http.MethodPut, path, b)
	}
	if err != nil {
		t.Fatalf("apply %s %s/%s: %v", head.Kind, head.Metadata.Namespace, head.Metadata.Name, err)
	}
}

// Delete removes the object at ObjectPath(apiVersion, kind, namespace, name).
func (c *Cluster) Delete(t testing.TB, apiVersion, kind, namespace, name string) {
	t.Helper()
	path, err := ObjectPath(apiVersion, kind, namespace, name)
	if err != nil {
		t.Fatal(err)
	}
	c.Do(t, http.MethodDelete, path, nil)
}

// InstallIstioCRDs applies Istio's CRDs from the istio.io/api module
// (kubernetes/customresourcedefinitions.gen.yaml) and waits until the
// mirrored kinds are served.
func (c *Cluster) InstallIstioCRDs(t testing.TB) {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = "/usr/local/go/bin/go"
	}
	out, err := exec.Command(goBin, "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locate istio.io/api module: %v", err)
	}
	file := filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("istio CRDs: %v", err)
	}
	docs, errs := manifest.Documents([]manifest.File{{Name: file, Data: data}})
	if len(errs) > 0 {
		t.Fatalf("istio CRDs: %v", errors.Join(errs...))
	}
	for _, d := range docs {
		c.applyJSON(t, d.JSON)
	}
	for _, p := range []string{
		"/apis/security.istio.io/v1/peerauthentications", "/apis/security.istio.io/v1/authorizationpolicies",
		"/apis/networking.istio.io/v1/destinationrules", "/apis/networking.istio.io/v1/gateways",
		"/apis/networking.istio.io/v1/virtualservices",
	} {
		e2eutil.Eventually(t, "CRD served: "+p, 60*time.Second, func() error {
			_, err := c.do(http.MethodGet, p, nil)
			return err
		})
	}
}

// ServiceAccountKubeconfig creates namespace/name (and the namespace) if
// missing, requests a one-hour token for it, and returns a kubeconfig that
// authenticates as it.
func (c *Cluster) ServiceAccountKubeconfig(t testing.TB, namespace, name string) string {
	t.Helper()
	c.Apply(t, fmt.Appendf(nil, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: %s\n  namespace: %s\n", namespace, name, namespace))
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}`)
	out := c.Do(t, http.MethodPost, "/api/v1/namespaces/"+namespace+"/serviceaccounts/"+name+"/token", body)
	var tr struct {
		Status struct {
			Token string `json:"token"`
		} `json:"status"`
	}
	if err := json.Unmarshal(out, &tr); err != nil || tr.Status.Token == "" {
		t.Fatalf("token for %s/%s: %v %s", namespace, name, err, out)
	}
	tokenFile := filepath.Join(c.dir, namespace+"-"+name+".token")
	write(t, tokenFile, []byte(tr.Status.Token))
	return c.writeKubeconfig(t, namespace+"-"+name, map[string]string{"tokenFile": tokenFile})
}

func write(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func newCA(t testing.TB) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kubetest client CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return key, cert
}

// issueClient returns a client certificate for user in group, and its key (PEM).
func issueClient(t testing.TB, caKey *ecdsa.PrivateKey, ca *x509.Certificate, user, group string) (*x509.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: user, Organization: []string{group}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return cert, pemBlock("EC PRIVATE KEY", keyDER)
}
