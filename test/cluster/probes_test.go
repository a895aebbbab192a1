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

// probedApp is a workload with its own HTTP and TCP probes on its app port,
// as users write them: under STRICT the kubelet's plaintext probes reach the
// app only if inject rewrites them to the sidecar's health port.
const probedApp = `apiVersion: v1
kind: ServiceAccount
metadata:
  name: %[1]s
  namespace: probes
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[1]s
  namespace: probes
  labels: {app: %[1]s}
spec:
  replicas: 1
  selector:
    matchLabels: {app: %[1]s}
  template:
    metadata:
      labels: {app: %[1]s}
    spec:
      serviceAccountName: %[1]s
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["serve", "-listen=:8080", "-text=probed"]
        ports:
        - {name: http, containerPort: 8080}
        startupProbe:
          httpGet: {path: /started, port: 8080}
          periodSeconds: 2
          failureThreshold: 30
        readinessProbe:
          httpGet: {path: /ready, port: http}
          periodSeconds: 2
        livenessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 5
          failureThreshold: 3
        securityContext:
          runAsNonRoot: true
          runAsUser: 65532
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
`

// testProbesUnderStrict (item 2): workloads injected in every capture mode,
// as native and as classic sidecars, reach Ready under mesh-wide STRICT with
// their own HTTP and TCP startup, readiness and liveness probes, and do not
// restart.
func testProbesUnderStrict(t *testing.T) {
	needCluster(t)
	if _, err := kubectl("get", "namespace", "probes"); err != nil {
		mustKubectl(t, "create", "namespace", "probes")
	}
	copyCARoot(t, "probes")
	tmp := t.TempDir()
	cm, err := kubectl("-n", "probes", "create", "configmap", "meshproxy-policy",
		"--from-file="+filepath.Join(repoRoot, "deploy/kubernetes/samples/policy/mesh-peerauthentication.yaml"), "--dry-run=client", "-o", "yaml")
	if err != nil {
		t.Fatal(err)
	}
	applyYAML(t, cm)

	apiIP := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	type workload struct{ name, mode, native string }
	var cases []workload
	for _, mode := range []string{"nftables", "iptables", "ebpf"} {
		for _, native := range []string{"true", "false"} {
			kind := map[string]string{"true": "native", "false": "classic"}[native]
			w := workload{name: "probed-" + mode + "-" + kind, mode: mode, native: native}
			cases = append(cases, w)
			src := filepath.Join(tmp, w.name+".yaml")
			if err := os.WriteFile(src, fmt.Appendf(nil, probedApp, w.name), 0o600); err != nil {
				t.Fatal(err)
			}
			injected := filepath.Join(tmp, w.name+"-injected.yaml")
			image := "meshproxy:dev"
			if mode == "iptables" {
				image = "meshproxy:dev-iptables" // the image with iptables-restore (images.sh)
			}
			args := []string{"inject", "-f", src, "-o", injected,
				"--image", image, "--mode", mode, "--native-sidecar=" + native,
				"--mesh-cidrs", "10.244.0.0/16,10.96.0.0/16",
				"--exclude-outbound-cidrs", apiIP + "/32," + clusterEnv["CLUSTER_DNS_IP"] + "/32"}
			if mode == "ebpf" {
				// Item 7: the init container finds the pod's cgroup on this
				// node (hybrid cgroup v1, cgroupfs, cgroupRoot /meshproxy-cluster).
				args = append(args, "--ebpf-cgroup", "auto")
			}
			out, err := exec.Command(meshproxyCLI, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("inject %s: %v\n%s", w.name, err, out)
			}
			mustKubectl(t, "apply", "-f", injected)
		}
	}
	// Wait for all at once: a failing case must not hold up the others.
	t.Cleanup(func() { kubectl("delete", "namespace", "probes", "--wait=false") })
	dumpOnFailure(t, "probes") // runs before the delete
	status := map[string]string{}
	ready := func(w workload) bool { return strings.Contains(status[w.name], "ready=True") }
	deadline := time.Now().Add(150 * time.Second)
	for time.Now().Before(deadline) {
		all := true
		for _, w := range cases {
			out, err := kubectl("-n", "probes", "get", "pods", "-l", "app="+w.name, "-o",
				`jsonpath={range .items[*]}{.metadata.name} ready={.status.conditions[?(@.type=="Ready")].status} restarts={.status.containerStatuses[*].restartCount}{"\n"}{end}`)
			if err != nil {
				out = err.Error()
			}
			status[w.name] = strings.TrimSpace(out)
			all = all && ready(w)
		}
		if all {
			break
		}
		time.Sleep(2 * time.Second)
	}
	for _, w := range cases {
		t.Run(w.name, func(t *testing.T) {
			if !ready(w) {
				t.Fatalf("%s not Ready under STRICT with its own probes after 150s: %s", w.name, status[w.name])
			}
			restarts := mustKubectl(t, "-n", "probes", "get", "pods", "-l", "app="+w.name, "-o", "jsonpath={.items[*].status.containerStatuses[*].restartCount}")
			for f := range strings.FieldsSeq(restarts) {
				if f != "0" {
					t.Errorf("%s restarted (restart counts %s): a probe failed", w.name, restarts)
					break
				}
			}
		})
	}
}
