package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// demoApp is one workload of the demo app image for a step's manifest: a
// Deployment (and a ServiceAccount unless account is empty, when the pod
// runs as the namespace's default account); annotations go on its pod.
type demoApp struct {
	name, namespace, account string
	args                     []string
	annotations              map[string]string
}

// manifest returns the workload's YAML, hardened as the samples are.
func (a demoApp) manifest() string {
	var b strings.Builder
	if a.account != "" {
		fmt.Fprintf(&b, "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: %s, namespace: %s}\n---\n", a.account, a.namespace)
	}
	var ann []string
	for k, v := range a.annotations {
		ann = append(ann, fmt.Sprintf("%q: %q", k, v))
	}
	args := make([]string, len(a.args))
	for i, s := range a.args {
		args[i] = fmt.Sprintf("%q", s)
	}
	fmt.Fprintf(&b, `apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: %[2]s, labels: {app: %[1]s}}
spec:
  replicas: 1
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata:
      labels: {app: %[1]s}
      annotations: {%[3]s}
    spec:
      serviceAccountName: %[4]s
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: [%[5]s]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
`, a.name, a.namespace, strings.Join(ann, ", "), cmpOr(a.account, "default"), strings.Join(args, ", "))
	return b.String()
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// copyCARoot copies the demo's ConfigMap meshproxy-ca-root (the CA's root,
// which injected sidecars mount) into namespace ns, and returns the root's
// file in a temporary directory.
func copyCARoot(t *testing.T, ns string) string {
	t.Helper()
	root := mustKubectl(t, "-n", "demo", "get", "configmap", "meshproxy-ca-root", "-o", `jsonpath={.data.root-cert\.pem}`)
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(rootFile, []byte(root), 0o600); err != nil {
		t.Fatal(err)
	}
	cm, err := kubectl("-n", ns, "create", "configmap", "meshproxy-ca-root", "--from-file=root-cert.pem="+rootFile, "--dry-run=client", "-o", "yaml")
	if err != nil {
		t.Fatal(err)
	}
	applyYAML(t, cm)
	return rootFile
}
