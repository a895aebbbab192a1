package cluster

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/certmanagerbin"
	"github.com/meshproxy/meshproxy/internal/e2eutil"
	"github.com/meshproxy/meshproxy/internal/testpki"
)

// Names of the cert-manager step: the second CA lives in its own namespace,
// under the names of deploy/kubernetes/certmanager-signer with suffix -cm,
// so the demo's CA keeps serving the other steps.
const (
	cmCANamespace  = "meshproxy-cm"
	cmAppNamespace = "cm-demo"
	cmCAService    = "meshproxy-ca-cm"
	cmIssuer       = "mesh-ca"
	cmServerText   = "hello from server, signed by cert-manager"
)

// testCertManagerSigner (issue 18): cert-manager's own controllers (built
// from its Go module by test/cluster/tools, run as a host process against the
// cluster's API server) with a CA Issuer holding a root and intermediate made
// here; a second meshproxy CA from deploy/kubernetes/certmanager-signer
// (--signer certmanager, its RBAC); client and server pods injected with
// --csr-trust-domain to use that CA. Their sidecars hold SVIDs the issuer's
// intermediate signed, one CertificateRequest is created and deleted per
// CSR, the client reaches the server under STRICT and a pod without a
// sidecar does not. Then, with cert-manager's approver stopped, the CA of
// deploy/kubernetes/certmanager-signer-approve approves its own requests.
func testCertManagerSigner(t *testing.T) {
	needCluster(t)
	dumpOnFailure(t, cmCANamespace, cmAppNamespace)
	cm, err := certmanagerbin.Find(filepath.Join(repoRoot, "test", "cluster", "tools"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Cluster-scoped objects by name; the namespaces take the rest.
		_, _ = kubectl("delete", "--wait=false", "--ignore-not-found", "clusterrolebinding,clusterrole",
			"meshproxy-ca-tokenreview-cm", "meshproxy-ca-istio-config-cm", "meshproxy-ca-certmanager-approve-cm")
		_, _ = kubectl("delete", "--wait=false", "--ignore-not-found", "namespace", cmAppNamespace, cmCANamespace)
	})

	// cert-manager's CRDs (server-side: the Certificate CRD is too large for
	// the last-applied annotation).
	mustKubectl(t, "apply", "--server-side", "--force-conflicts", "-f", cm.CRDs)
	waitEstablished(t, "certificaterequests.cert-manager.io", "issuers.cert-manager.io", "clusterissuers.cert-manager.io")

	// The mesh CA: a root and an intermediate made here; the intermediate's
	// key goes only into the CA issuer's Secret, piped to kubectl.
	pki := testpki.NewWithTTL(t, "cluster.local", 7*24*time.Hour)
	keyDER, err := x509.MarshalECPrivateKey(pki.IntermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	rootPEM := testpki.PEMCerts(pki.Root)
	mustKubectl(t, "create", "namespace", cmCANamespace)
	mustKubectl(t, "create", "namespace", cmAppNamespace)
	secret, err := json.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
		"metadata": map[string]any{"name": cmIssuer, "namespace": cmCANamespace},
		"data": map[string][]byte{
			"tls.crt": testpki.PEMCerts(pki.Intermediate, pki.Root),
			"tls.key": pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
			"ca.crt":  rootPEM,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	// create, not apply: apply would copy the key into an annotation.
	if out, err := kubectlStdin(secret, "create", "-f", "-"); err != nil {
		t.Fatalf("create the issuer's Secret: %v: %s", err, out)
	}
	applyYAML(t, fmt.Sprintf(`apiVersion: cert-manager.io/v1
kind: Issuer
metadata: {name: %s, namespace: %s}
spec:
  ca: {secretName: %s}
`, cmIssuer, cmCANamespace, cmIssuer))
	for _, ns := range []string{cmCANamespace, cmAppNamespace} {
		if out, err := kubectlStdin(rootPEM, "-n", ns, "create", "configmap", "meshproxy-ca-root", "--from-file=root-cert.pem=/dev/stdin"); err != nil {
			t.Fatalf("ConfigMap meshproxy-ca-root in %s: %v: %s", ns, err, out)
		}
	}

	// Every CertificateRequest, from the first on: the CA's serving
	// certificate, then one per sidecar CSR.
	watch := watchRequests(t)

	controller := e2eutil.Start(t, cm.Controller, nil, "--kubeconfig", clusterEnv["CLUSTER_KUBECONFIG"],
		"--namespace", cmCANamespace, "--cluster-resource-namespace", cmCANamespace)
	waitFor(t, "the CA Issuer Ready", 2*time.Minute, func() error {
		select {
		case <-controller.Done():
			t.Fatalf("cert-manager-controller exited: %v\n%s", controller.Err(), controller.Output.String())
		default:
		}
		out, err := kubectl("-n", cmCANamespace, "get", "issuer", cmIssuer, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if out != "True" {
			return fmt.Errorf("%w: Ready=%q", errNotYet, out)
		}
		return nil
	})

	// The second CA: deploy/kubernetes/certmanager-signer as users apply it.
	applyCertManagerCA(t, "certmanager-signer")
	args := mustKubectl(t, "-n", cmCANamespace, "get", "deploy/"+cmCAService, "-o", "jsonpath={.spec.template.spec.containers[0].args}")
	if !strings.Contains(args, `"--signer","certmanager"`) {
		t.Fatalf("the CA Deployment's args %s lack --signer certmanager", args)
	}
	rollout(t, cmCANamespace, cmCAService)
	// Least privilege: the CA's service account may handle its
	// CertificateRequests and nothing else of cert-manager's, nor Secrets.
	sa := "system:serviceaccount:" + cmCANamespace + ":" + cmCAService
	for _, c := range []struct {
		verb, resource, sub string
		want                string
	}{
		{"create", "certificaterequests.cert-manager.io", "", "yes"},
		{"get", "certificaterequests.cert-manager.io", "", "yes"},
		{"delete", "certificaterequests.cert-manager.io", "", "yes"},
		{"list", "certificaterequests.cert-manager.io", "", "no"},
		{"update", "certificaterequests.cert-manager.io", "", "no"},
		{"patch", "certificaterequests.cert-manager.io", "status", "no"}, // approval: only with --certmanager-approve
		{"get", "issuers.cert-manager.io", "", "no"},
		{"get", "secrets", "", "no"},
	} {
		out, _ := kubectl("auth", "can-i", "--as", sa, "-n", cmCANamespace, c.verb, c.resource, "--subresource="+c.sub)
		if got := strings.TrimSpace(out); got != c.want {
			t.Errorf("%s may %s %s (subresource %q): %q, want %s", sa, c.verb, c.resource, c.sub, got, c.want)
		}
	}

	// The workloads, injected for that CA.
	in := filepath.Join(t.TempDir(), "workloads.yaml")
	injected := filepath.Join(filepath.Dir(in), "injected.yaml")
	if err := os.WriteFile(in, []byte(cmWorkloads()), 0o600); err != nil {
		t.Fatal(err)
	}
	apiIP := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	dnsIP := strings.TrimSpace(mustKubectl(t, "-n", "kube-system", "get", "service", "kube-dns", "-o", "jsonpath={.spec.clusterIP}"))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inject := exec.CommandContext(ctx, meshproxyCLI, "inject", "-f", in, "-o", injected,
		"--image", "meshproxy:dev",
		"--ca-addr", cmCAService+"."+cmCANamespace+".svc:15012",
		"--csr-trust-domain", "cluster.local",
		"--mesh-cidrs", "10.244.0.0/16,10.96.0.0/16",
		"--exclude-outbound-cidrs", apiIP+"/32,"+dnsIP+"/32")
	if out, err := inject.CombinedOutput(); err != nil {
		t.Fatalf("meshproxy inject: %v\n%s", err, out)
	}
	mustKubectl(t, "apply", "-f", injected)
	for _, d := range []string{"server", "client", "plain"} {
		rollout(t, cmAppNamespace, d)
	}

	// The sidecars' SVIDs: their own service account's SPIFFE ID, signed by
	// the issuer's intermediate, trusting the root made here only.
	for _, app := range []string{"client", "server"} {
		want := "spiffe://cluster.local/ns/" + cmAppNamespace + "/sa/" + app
		waitFor(t, app+"'s SVID from cert-manager", time.Minute, func() error {
			return checkCertManagerSVID(app, want, pki)
		})
	}

	// Mesh mTLS under STRICT between the two; plaintext refused.
	waitFor(t, "client -> server under STRICT", time.Minute, func() error {
		out, err := kubectl("-n", cmAppNamespace, "exec", "deploy/client", "-c", "client", "--",
			"demoapp", "get", "-timeout", "10s", "http://server."+cmAppNamespace+".svc/")
		if err != nil {
			return err
		}
		if !strings.Contains(out, cmServerText) {
			return fmt.Errorf("client got %q", out)
		}
		return nil
	})
	if out, err := kubectl("-n", cmAppNamespace, "exec", "deploy/plain", "-c", "plain", "--",
		"demoapp", "get", "-timeout", "5s", "http://server."+cmAppNamespace+".svc/"); err == nil {
		t.Errorf("a pod without a sidecar reached the server under STRICT: %q", out)
	}

	// Without cert-manager's approver, the CA approves its own requests:
	// deploy/kubernetes/certmanager-signer-approve (--certmanager-approve and
	// the status patch it needs). The new CA pod's serving certificate and a
	// restarted client's SVID come only through its approval.
	controller.Stop(t, 30*time.Second)
	e2eutil.Start(t, cm.Controller, nil, "--kubeconfig", clusterEnv["CLUSTER_KUBECONFIG"],
		"--namespace", cmCANamespace, "--cluster-resource-namespace", cmCANamespace,
		"--controllers", "issuers,certificaterequests-issuer-ca")
	applyCertManagerCA(t, "certmanager-signer-approve")
	if out, _ := kubectl("auth", "can-i", "--as", sa, "-n", cmCANamespace, "patch", "certificaterequests.cert-manager.io", "--subresource=status"); strings.TrimSpace(out) != "yes" {
		t.Errorf("with certmanager-signer-approve %s may not patch certificaterequests/status: %q", sa, out)
	}
	rollout(t, cmCANamespace, cmCAService)
	mustKubectl(t, "-n", cmAppNamespace, "rollout", "restart", "deploy/client")
	rollout(t, cmAppNamespace, "client")
	waitFor(t, "the restarted client's SVID from cert-manager", time.Minute, func() error {
		return checkCertManagerSVID("client", "spiffe://cluster.local/ns/"+cmAppNamespace+"/sa/client", pki)
	})
	if out, err := kubectl("-n", cmAppNamespace, "exec", "deploy/client", "-c", "client", "--",
		"demoapp", "get", "-timeout", "10s", "http://server."+cmAppNamespace+".svc/"); err != nil || !strings.Contains(out, cmServerText) {
		t.Errorf("the restarted client -> server: %q, %v", out, err)
	}

	// One CertificateRequest per CSR, each deleted once the CA had its
	// certificate: the watch saw them come and go, and none is left.
	waitFor(t, "no CertificateRequest left", time.Minute, func() error {
		out, err := kubectl("-n", cmCANamespace, "get", "certificaterequests.cert-manager.io", "-o", "name")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "" {
			return fmt.Errorf("%w: %s", errNotYet, out)
		}
		return nil
	})
	seen, err := parseRequestWatch(watch())
	if err != nil {
		t.Fatal(err)
	}
	// Approved by cert-manager's approver first, by meshproxy after: the
	// two phases' requests, in the order they were created.
	approvers := map[string][]string{}
	for _, r := range seen {
		if !r.deleted {
			t.Errorf("CertificateRequest %s (%s) was never deleted", r.name, r.id)
		}
		if r.issuer != cmIssuer {
			t.Errorf("CertificateRequest %s names issuer %q, want %s", r.name, r.issuer, cmIssuer)
		}
		approvers[r.id] = append(approvers[r.id], r.approvedBy)
	}
	clientID := "spiffe://cluster.local/ns/" + cmAppNamespace + "/sa/client"
	serverID := "spiffe://cluster.local/ns/" + cmAppNamespace + "/sa/server"
	for id, want := range map[string][]string{
		"":       {"cert-manager.io", "meshproxy.io"}, // the CA's serving certificate, per CA pod
		clientID: {"cert-manager.io", "meshproxy.io"},
		serverID: {"cert-manager.io"},
	} {
		if got := approvers[id]; !slices.Equal(got, want) {
			t.Errorf("CertificateRequests for %q approved by %q, want one per CSR approved by %q", id, got, want)
		}
	}
	t.Logf("CertificateRequests created and deleted: %+v", seen)
}

// cmWorkloads are the step's workloads before injection: server and client
// with their own service accounts, plain opted out of injection, and STRICT
// for the namespace.
func cmWorkloads() string {
	return strings.NewReplacer("NS", cmAppNamespace, "TEXT", cmServerText).Replace(`apiVersion: v1
kind: ConfigMap
metadata: {name: meshproxy-policy, namespace: NS}
data:
  strict.yaml: |
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: NS}
    spec:
      mtls: {mode: STRICT}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: NS}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: NS}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: NS}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 5678, protocol: TCP}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: server, namespace: NS, labels: {app: server}}
spec:
  replicas: 1
  selector: {matchLabels: {app: server}}
  template:
    metadata: {labels: {app: server}}
    spec:
      serviceAccountName: server
      automountServiceAccountToken: false
      containers:
      - name: server
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["serve", "-listen=:5678", "-text=TEXT"]
        ports: [{name: http, containerPort: 5678, protocol: TCP}]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: NS, labels: {app: client}}
spec:
  replicas: 1
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      automountServiceAccountToken: false
      containers:
      - name: client
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["sleep"]
        securityContext: {runAsNonRoot: true, runAsUser: 100, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: plain, namespace: NS, labels: {app: plain}}
spec:
  replicas: 1
  selector: {matchLabels: {app: plain}}
  template:
    metadata:
      labels: {app: plain}
      annotations: {sidecar.meshproxy.io/inject: "false"}
    spec:
      automountServiceAccountToken: false
      containers:
      - name: plain
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["sleep"]
        securityContext: {runAsNonRoot: true, runAsUser: 100, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
`)
}

// checkCertManagerSVID checks app's sidecar holds want, in a chain whose leaf
// the issuer's intermediate signed and that verifies to pki's root, with
// that root as its only trusted root.
func checkCertManagerSVID(app, want string, pki *testpki.CA) error {
	out, err := kubectl("-n", cmAppNamespace, "exec", "deploy/"+app, "-c", "meshproxy", "--", "meshproxy", "identity", "-o", "json")
	if err != nil {
		return err
	}
	var id struct {
		SPIFFEID  string `json:"spiffe_id"`
		ChainPEM  string `json:"chain_pem"`
		BundlePEM string `json:"bundle_pem"`
	}
	if err := json.Unmarshal([]byte(out), &id); err != nil {
		return fmt.Errorf("meshproxy identity -o json: %w: %q", err, out)
	}
	if id.SPIFFEID != want {
		return fmt.Errorf("%s's sidecar holds %q, want %s", app, id.SPIFFEID, want)
	}
	chain, err := parseCerts(id.ChainPEM)
	if err != nil || len(chain) == 0 {
		return fmt.Errorf("%s's chain: %v (%d certificates)", app, err, len(chain))
	}
	if err := chain[0].CheckSignatureFrom(pki.Intermediate); err != nil {
		return fmt.Errorf("%s's SVID (issuer %q) is not signed by the cert-manager issuer's intermediate: %w", app, chain[0].Issuer, err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(pki.Root)
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("%s's chain does not verify to the root made for the issuer: %w", app, err)
	}
	bundle, err := parseCerts(id.BundlePEM)
	if err != nil || len(bundle) == 0 || slices.ContainsFunc(bundle, func(c *x509.Certificate) bool { return !c.Equal(pki.Root) }) {
		return fmt.Errorf("%s's trust bundle is not the issuer's root alone: %d certificates, %v", app, len(bundle), err)
	}
	return nil
}

func parseCerts(p string) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := []byte(p)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return certs, nil
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
}

// watchedRequest is one CertificateRequest seen by the watch.
type watchedRequest struct {
	name, issuer string
	id           string // the CSR's URI SAN; empty for the CA's serving certificate
	approvedBy   string // the Approved condition's reason
	deleted      bool
}

// parseRequestWatch reads `kubectl get --watch --output-watch-events -o
// json`: a stream of {type, object} events.
func parseRequestWatch(stream string) ([]watchedRequest, error) {
	var seen []watchedRequest
	dec := json.NewDecoder(strings.NewReader(stream))
	for {
		var ev struct {
			Type   string
			Object struct {
				Metadata struct{ Name string }
				Spec     struct {
					Request   string
					IssuerRef struct{ Name string } `json:"issuerRef"`
				}
				Status struct {
					Conditions []struct{ Type, Status, Reason string }
				}
			}
		}
		err := dec.Decode(&ev)
		if errors.Is(err, io.EOF) {
			return seen, nil
		}
		if err != nil {
			// The watch was killed mid-event: what came before stands.
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return seen, nil
			}
			return seen, fmt.Errorf("the CertificateRequest watch: %w", err)
		}
		name := ev.Object.Metadata.Name
		i := slices.IndexFunc(seen, func(r watchedRequest) bool { return r.name == name })
		if i < 0 {
			r := watchedRequest{name: name, issuer: ev.Object.Spec.IssuerRef.Name}
			csrPEM, err := base64.StdEncoding.DecodeString(ev.Object.Spec.Request)
			if err != nil {
				return seen, fmt.Errorf("CertificateRequest %s: spec.request: %w", name, err)
			}
			if b, _ := pem.Decode(csrPEM); b != nil {
				if csr, err := x509.ParseCertificateRequest(b.Bytes); err == nil && len(csr.URIs) == 1 && len(csr.DNSNames) == 0 {
					r.id = csr.URIs[0].String()
				}
			}
			seen = append(seen, r)
			i = len(seen) - 1
		}
		for _, c := range ev.Object.Status.Conditions {
			if c.Type == "Approved" && c.Status == "True" {
				seen[i].approvedBy = c.Reason
			}
		}
		if ev.Type == "DELETED" {
			seen[i].deleted = true
		}
	}
}

// watchRequests watches the CA namespace's CertificateRequests until the
// returned function stops the watch and returns what it printed.
func watchRequests(t *testing.T) func() string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	cmd := exec.CommandContext(ctx, filepath.Join(clusterEnv["K8S_BIN"], "kubectl"), "--kubeconfig", clusterEnv["CLUSTER_KUBECONFIG"],
		"-n", cmCANamespace, "get", "certificaterequests.cert-manager.io", "--watch", "--output-watch-events", "-o", "json")
	cmd.WaitDelay = 5 * time.Second
	stdout, stderr := &e2eutil.Buffer{}, &e2eutil.Buffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("watch CertificateRequests: %v", err)
	}
	stopped := false
	stop := func() string {
		if !stopped {
			stopped = true
			cancel()
			_ = cmd.Wait()
		}
		return stdout.String()
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("the CertificateRequest watch's stderr: %s", stderr.String())
		}
	})
	return stop
}

// applyCertManagerCA applies deploy/kubernetes/OVERLAY as users do, moved
// to the step's CA namespace with suffix -cm, one replica and its Service's
// name in its serving certificate.
func applyCertManagerCA(t *testing.T, overlay string) {
	t.Helper()
	kdir := t.TempDir()
	rel, err := filepath.Rel(kdir, filepath.Join(repoRoot, "deploy", "kubernetes", overlay))
	if err != nil {
		t.Fatal(err)
	}
	kustomization := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: %s
nameSuffix: -cm
resources:
- %s
patches:
- target: {kind: Deployment, name: meshproxy-ca}
  patch: |-
    - op: replace
      path: /spec/replicas
      value: 1
    - op: add
      path: /spec/template/spec/containers/0/args/-
      value: --serving-dns=%s.%s.svc
`, cmCANamespace, rel, cmCAService, cmCANamespace)
	if err := os.WriteFile(filepath.Join(kdir, "kustomization.yaml"), []byte(kustomization), 0o600); err != nil {
		t.Fatal(err)
	}
	mustKubectl(t, "apply", "-k", kdir)
}

// rollout waits, bounded, for a Deployment's rollout.
func rollout(t *testing.T, ns, name string) {
	t.Helper()
	waitFor(t, ns+"/"+name+" rolled out", 3*time.Minute, func() error {
		_, err := kubectl("-n", ns, "rollout", "status", "deploy/"+name, "--timeout=20s")
		return err
	})
}

// kubectlStdin is kubectl with stdin, bounded to a minute.
func kubectlStdin(stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(clusterEnv["K8S_BIN"], "kubectl"),
		append([]string{"--kubeconfig", clusterEnv["CLUSTER_KUBECONFIG"]}, args...)...)
	cmd.Stdin = bytes.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}
