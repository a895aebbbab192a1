package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// crWorkloads are the workloads of item 4, in namespace crs: a server
// behind a ClusterIP Service, a meshed client and an uninjected one.
func crWorkloads() string {
	return demoApp{name: "server", namespace: "crs", account: "server", args: []string{"serve", "-listen=:8080", "-text=hello from crs"}}.manifest() +
		demoApp{name: "client", namespace: "crs", account: "client", args: []string{"sleep"}}.manifest() +
		demoApp{name: "plain", namespace: "crs", args: []string{"sleep"},
			annotations: map[string]string{"sidecar.meshproxy.io/inject": "false"}}.manifest() +
		`apiVersion: v1
kind: Service
metadata: {name: server, namespace: crs}
spec:
  selector: {app: server}
  ports:
  - {name: http, port: 80, targetPort: 8080}
`
}

// caAccount is the CA Deployment's service account, as kubectl's --as names it.
const caAccount = "system:serviceaccount:istio-system:meshproxy-ca"

// testIstioCRsTakeEffect (item 4): with Istio's CRDs installed, `kubectl
// apply` of a PeerAuthentication and an AuthorizationPolicy changes what
// running sidecars enforce within seconds, with no restart: the CA
// Deployment from deploy/kubernetes mirrors the custom resources
// (--mirror-istio-config) and the sidecars, injected with --config-server,
// follow it. The CA's role allows that and nothing more.
func testIstioCRsTakeEffect(t *testing.T) {
	needCluster(t)

	// Istio's own CRDs, from the istio.io/api module this repository pins.
	list := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api")
	list.Dir = repoRoot
	dir, err := list.Output()
	if err != nil {
		t.Fatalf("locate the istio.io/api module: %v", err)
	}
	crds := filepath.Join(strings.TrimSpace(string(dir)), "kubernetes", "customresourcedefinitions.gen.yaml")
	mustKubectl(t, "apply", "--server-side", "--force-conflicts", "-f", crds)
	waitEstablished(t, "peerauthentications.security.istio.io", "authorizationpolicies.security.istio.io")
	testMirrorRBACIsMinimal(t) // kubectl auth can-i knows the kinds once their CRDs exist

	if _, err := kubectl("get", "namespace", "crs"); err != nil {
		mustKubectl(t, "create", "namespace", "crs")
	}
	t.Cleanup(func() { kubectl("delete", "namespace", "crs", "--wait=false") })
	dumpOnFailure(t, "crs") // runs before the delete
	copyCARoot(t, "crs")
	tmp := t.TempDir()
	src, injected := filepath.Join(tmp, "crs.yaml"), filepath.Join(tmp, "crs-injected.yaml")
	if err := os.WriteFile(src, []byte(crWorkloads()), 0o600); err != nil {
		t.Fatal(err)
	}
	apiIP := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	out, err := exec.Command(meshproxyCLI, "inject", "-f", src, "-o", injected,
		"--image", "meshproxy:dev", "--config-server", "meshproxy-ca.istio-system.svc:15011",
		"--mesh-cidrs", "10.244.0.0/16,10.96.0.0/16",
		"--exclude-outbound-cidrs", apiIP+"/32,"+clusterEnv["CLUSTER_DNS_IP"]+"/32").CombinedOutput()
	if err != nil {
		t.Fatalf("inject: %v\n%s", err, out)
	}
	mustKubectl(t, "apply", "-f", injected)
	for _, d := range []string{"server", "client", "plain"} {
		mustKubectl(t, "-n", "crs", "rollout", "status", "deploy/"+d, "--timeout=120s")
	}
	serverPod := func() string {
		return strings.TrimSpace(mustKubectl(t, "-n", "crs", "get", "pods", "-l", "app=server", "-o",
			`jsonpath={range .items[*]}{.metadata.uid} restarts={.status.containerStatuses[*].restartCount}{end}`))
	}
	before := serverPod()

	get := func(from string) error {
		out, err := kubectl("-n", "crs", "exec", "deploy/"+from, "-c", "app", "--", "demoapp", "get", "-timeout", "5s", "http://server.crs.svc/")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "hello from crs") {
			return fmt.Errorf("%s got %q", from, out)
		}
		return nil
	}
	refused := func(from string) func() error {
		return func() error {
			if err := get(from); err == nil {
				return fmt.Errorf("%w: %s still reaches the server", errNotYet, from)
			}
			return nil
		}
	}
	reaches := func(from string) func() error { return func() error { return get(from) } }
	// Each change must be enforced within this bound; the mirror's watch
	// normally carries it in well under a second, but the CRDs were just
	// installed and the mirror retries a missing kind with backoff (≤30s).
	const within = 60 * time.Second

	// No Istio policy anywhere yet: PERMISSIVE, as in Istio.
	waitFor(t, "the meshed client reaches the server", within, reaches("client"))
	waitFor(t, "the plaintext client reaches the server under PERMISSIVE", within, reaches("plain"))

	applyYAML(t, `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: crs}
spec:
  mtls: {mode: STRICT}
`)
	waitFor(t, "PeerAuthentication STRICT refuses plaintext", within, refused("plain"))
	if err := get("client"); err != nil {
		t.Fatalf("the meshed client is refused under STRICT: %v", err)
	}

	applyYAML(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: crs}
spec:
  selector:
    matchLabels: {app: server}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/crs/sa/client"]
`)
	waitFor(t, "AuthorizationPolicy DENY refuses the client", within, refused("client"))

	mustKubectl(t, "-n", "crs", "delete", "authorizationpolicy", "deny-client")
	waitFor(t, "deleting the AuthorizationPolicy lets the client in again", within, reaches("client"))
	mustKubectl(t, "-n", "crs", "delete", "peerauthentication", "default")
	waitFor(t, "deleting the PeerAuthentication lets plaintext in again", within, reaches("plain"))

	if after := serverPod(); after != before {
		t.Errorf("the server's pod changed or restarted while policy changed: before %q, after %q", before, after)
	}
}

// testMirrorRBACIsMinimal: the CA's service account may create TokenReviews
// and list and watch the five Istio kinds it mirrors, and nothing else the
// mirror might be tempted to use (the API server answers, not the YAML).
func testMirrorRBACIsMinimal(t *testing.T) {
	t.Helper()
	can := func(verb, resource string) bool {
		out, _ := kubectl("auth", "can-i", "--as", caAccount, verb, resource, "--all-namespaces")
		return strings.TrimSpace(out) == "yes"
	}
	kinds := []string{
		"peerauthentications.security.istio.io", "authorizationpolicies.security.istio.io",
		"destinationrules.networking.istio.io", "gateways.networking.istio.io", "virtualservices.networking.istio.io",
	}
	for _, k := range kinds {
		for _, verb := range []string{"list", "watch"} {
			if !can(verb, k) {
				t.Errorf("the CA may not %s %s: the mirror cannot work", verb, k)
			}
		}
		for _, verb := range []string{"get", "create", "update", "patch", "delete"} {
			if can(verb, k) {
				t.Errorf("the CA may %s %s: more than the mirror needs", verb, k)
			}
		}
	}
	if !can("create", "tokenreviews.authentication.k8s.io") {
		t.Error("the CA may not create TokenReviews")
	}
	for _, r := range []string{"secrets", "pods", "configmaps", "serviceaccounts/token", "sidecars.networking.istio.io", "envoyfilters.networking.istio.io"} {
		for _, verb := range []string{"get", "list", "create"} {
			if can(verb, r) {
				t.Errorf("the CA may %s %s cluster-wide: more than it needs", verb, r)
			}
		}
	}
}
