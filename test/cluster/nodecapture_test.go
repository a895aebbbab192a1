package cluster

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// Issue 16's proof on the cluster: capture installed from the node by the
// node agent's chained CNI plugin, for workloads in a namespace that
// enforces the restricted Pod Security Standard.
const (
	nodeCapNS = "nodecap"
	// nodeCapBinDir is this node's CNI bin directory: up.sh points
	// containerd at Debian's plugins in /usr/lib/cni, not /opt/cni/bin.
	nodeCapBinDir = "/usr/lib/cni"
	// nodeAgentSelector selects the DaemonSet's pods in kube-system.
	nodeAgentSelector = "app=meshproxy-node-agent"
)

// nodeCapModes are the capture modes proved, one client/server pair each.
var nodeCapModes = []string{"nftables", "ebpf"}

// testNodeCapture (issue 16): the node agent from deploy/kubernetes/node-agent
// chains meshproxy's CNI plugin into this node's CNI configuration; in a
// namespace enforcing restricted, workloads injected with --capture node (no
// capability anywhere in the pod) run under STRICT with their traffic
// captured, for nftables and eBPF; a pod without the injection on the same
// node is not captured; restarting the agent during traffic loses no
// connection, leaves running pods' capture in place, and new pods still get
// capture afterwards; with the agent removed, running pods keep their
// capture and new injected pods fail instead of running without it.
func testNodeCapture(t *testing.T) {
	needCluster(t)
	// Cleanups run last-registered first: the dumps before the removal.
	t.Cleanup(func() { removeNodeCapture(t) })
	dumpOnFailure(t, nodeCapNS)
	t.Cleanup(func() {
		if t.Failed() {
			out, err := kubectl("-n", "kube-system", "logs", "-l", nodeAgentSelector, "--all-containers", "--prefix", "--tail=40")
			t.Logf("node agent logs:\n%s%v", out, errOrEmpty(err))
		}
	})
	deployNodeAgent(t)
	deployNodeCapWorkloads(t)

	t.Run("RestrictedRefusesInitCapture", testNodeCapRefusesInit)
	for _, mode := range nodeCapModes {
		t.Run("MTLSOnTheWire_"+mode, func(t *testing.T) { testNodeCapWire(t, mode) })
	}
	t.Run("UninjectedPodNotCaptured", testNodeCapUninjected)
	t.Run("AgentRestartLosesNoConnection", testNodeCapAgentRestart)
	t.Run("AgentRemovedFailsClosed", testNodeCapAgentRemoved)
}

// nodeCapConfDir is where this node's CNI configuration lives (up.sh writes
// the conflist there and points containerd at it).
func nodeCapConfDir() string { return filepath.Join(clusterEnv["CLUSTER_STATE"], "cni", "net.d") }

// nodeCgroupRoot is the kubelet's cgroup root on the node's cgroup v2 mount:
// /sys/fs/cgroup on a pure cgroup v2 host, /sys/fs/cgroup/unified on a
// hybrid one (as this machine is), below which the kubelet's --cgroup-root.
func nodeCgroupRoot(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ... - FSTYPE SOURCE SUPER
		fields := strings.Fields(sc.Text())
		i := slices.Index(fields, "-")
		if i < 0 || i+1 >= len(fields) || len(fields) < 5 || fields[i+1] != "cgroup2" {
			continue
		}
		if mp := fields[4]; mp == "/sys/fs/cgroup" || mp == "/sys/fs/cgroup/unified" {
			return filepath.Join(mp, clusterEnv["CLUSTER_CGROUP"])
		}
	}
	t.Fatal("no cgroup v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified: eBPF capture attaches to a pod's cgroup v2")
	return ""
}

// deployNodeAgent applies deploy/kubernetes/node-agent — the manifest users
// apply — through a kustomize overlay that patches only what this node
// differs in: its CNI bin directory (/usr/lib/cni), its CNI configuration
// directory (under the cluster's state directory, mounted at the same path
// so the kubeconfig the agent writes names files the plugin finds on the
// host), and the cgroup root of its pods (hybrid cgroups, kubelet
// --cgroup-root). It waits until the plugin is chained in the conflist.
func deployNodeAgent(t *testing.T) {
	t.Helper()
	conf := nodeCapConfDir()
	overlay := t.TempDir()
	base, err := filepath.Rel(overlay, filepath.Join(repoRoot, "deploy", "kubernetes", "node-agent"))
	if err != nil {
		t.Fatal(err)
	}
	kust := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
- %s
patches:
- target: {kind: DaemonSet, name: meshproxy-node-agent}
  patch: |-
    - {op: test, path: /spec/template/spec/volumes/0/name, value: cni-bin}
    - {op: replace, path: /spec/template/spec/volumes/0/hostPath/path, value: %s}
    - {op: test, path: /spec/template/spec/volumes/1/name, value: cni-conf}
    - {op: replace, path: /spec/template/spec/volumes/1/hostPath/path, value: %s}
    - {op: test, path: /spec/template/spec/containers/0/volumeMounts/1/name, value: cni-conf}
    - {op: replace, path: /spec/template/spec/containers/0/volumeMounts/1/mountPath, value: %s}
    - op: replace
      path: /spec/template/spec/containers/0/args
      value: [node-agent, --mode, nftables, --bin-dir, /opt/cni/bin, --conf-dir, %s, --cgroup-root, %s]
`, base, nodeCapBinDir, conf, conf, conf, nodeCgroupRoot(t))
	if err := os.WriteFile(filepath.Join(overlay, "kustomization.yaml"), []byte(kust), 0o600); err != nil {
		t.Fatal(err)
	}
	mustKubectl(t, "apply", "-k", overlay)
	mustKubectl(t, "-n", "kube-system", "rollout", "status", "ds/meshproxy-node-agent", "--timeout=120s")
	conflist := filepath.Join(conf, "10-meshproxy-cluster.conflist")
	waitFor(t, "meshproxy-cni chained in "+conflist, time.Minute, func() error {
		b, err := os.ReadFile(conflist)
		if err != nil {
			return err
		}
		if !strings.Contains(string(b), `"meshproxy-cni"`) {
			return fmt.Errorf("%w: %s", errNotYet, b)
		}
		if _, err := os.Stat(filepath.Join(nodeCapBinDir, "meshproxy-cni")); err != nil {
			return fmt.Errorf("%w: plugin binary: %w", errNotYet, err)
		}
		return nil
	})
}

// nodeCapApp is one workload of the namespace: a server (demoapp serve
// behind a ClusterIP Service) or a client (demoapp loop to a server,
// counting failures in its log) or a plain pod to exec into.
func nodeCapApp(name, args string, service bool) string {
	m := fmt.Sprintf(`apiVersion: v1
kind: ServiceAccount
metadata:
  name: %[1]s
  namespace: %[2]s
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: %[1]s
  namespace: %[2]s
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
      terminationGracePeriodSeconds: 5
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: %[3]s
        resources:
          requests: {cpu: 10m, memory: 16Mi}
          limits: {memory: 64Mi}
        securityContext:
          readOnlyRootFilesystem: true
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
`, name, nodeCapNS, args)
	if service {
		m += fmt.Sprintf(`        ports:
        - {name: http, containerPort: 5678, protocol: TCP}
        readinessProbe:
          httpGet: {path: /, port: http}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: %[1]s
  namespace: %[2]s
  labels: {app: %[1]s}
spec:
  selector: {app: %[1]s}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
`, name, nodeCapNS)
	}
	return m
}

func serverArgs(name string) string {
	return fmt.Sprintf(`[serve, -listen=:5678, "-text=hello from %s"]`, name)
}

// nodeCapInject runs the workstation meshproxy inject on a manifest.
func nodeCapInject(t *testing.T, manifest string, extra ...string) string {
	t.Helper()
	d := t.TempDir()
	in, out := filepath.Join(d, "in.yaml"), filepath.Join(d, "out.yaml")
	if err := os.WriteFile(in, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	api := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	args := append([]string{"inject", "-f", in, "-o", out, "--image", "meshproxy:dev",
		"--mesh-cidrs", clusterEnv["CLUSTER_POD_CIDR"] + "," + clusterEnv["CLUSTER_SVC_CIDR"],
		"--exclude-outbound-cidrs", api + "/32," + clusterEnv["CLUSTER_DNS_IP"] + "/32"}, extra...)
	if b, err := exec.Command(meshproxyCLI, args...).CombinedOutput(); err != nil {
		t.Fatalf("meshproxy %s: %v\n%s", strings.Join(args, " "), err, b)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// deployNodeCapWorkloads creates the restricted namespace with, per capture
// mode, a server and a client injected with --capture node, and two pods
// without injection: a plaintext server and a pod to exec into.
func deployNodeCapWorkloads(t *testing.T) {
	t.Helper()
	applyYAML(t, fmt.Sprintf(`apiVersion: v1
kind: Namespace
metadata:
  name: %s
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
`, nodeCapNS))
	// The CA's root, as demo.sh gives namespace demo, and the mesh-wide
	// STRICT policy the sidecars enforce.
	copyCARoot(t, nodeCapNS)
	mustKubectl(t, "-n", nodeCapNS, "create", "configmap", "meshproxy-policy",
		"--from-file="+filepath.Join(repoRoot, "deploy", "kubernetes", "base", "policy", "mesh-peerauthentication.yaml"))

	deployments := []string{"plain", "plain-server"}
	for _, mode := range nodeCapModes {
		server, client := "server-"+mode, "client-"+mode
		m := nodeCapApp(server, serverArgs(server), true) + "---\n" +
			nodeCapApp(client, fmt.Sprintf(`[loop, -every=500ms, -timeout=5s, "http://%s.%s.svc/"]`, server, nodeCapNS), false)
		applyYAML(t, nodeCapInject(t, m, "--capture", "node", "--mode", mode))
		deployments = append(deployments, server, client)
	}
	applyYAML(t, nodeCapApp("plain-server", serverArgs("plain-server"), true)+"---\n"+nodeCapApp("plain", "[sleep]", false))
	for _, d := range deployments {
		// Admission accepted the pods and they became Ready: the validation
		// init container saw the capture in place.
		mustKubectl(t, "-n", nodeCapNS, "rollout", "status", "deploy/"+d, "--timeout=180s")
	}
}

// testNodeCapRefusesInit: the namespace really enforces restricted — a pod
// injected the usual way (--capture init, NET_ADMIN) is refused.
func testNodeCapRefusesInit(t *testing.T) {
	pod := fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: init-capture
  namespace: %s
spec:
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    seccompProfile: {type: RuntimeDefault}
  containers:
  - name: app
    image: meshproxy-demo-app:dev
    args: [sleep]
    securityContext:
      allowPrivilegeEscalation: false
      capabilities: {drop: [ALL]}
`, nodeCapNS)
	f := filepath.Join(t.TempDir(), "pod.yaml")
	if err := os.WriteFile(f, []byte(nodeCapInject(t, pod)), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := kubectl("apply", "--dry-run=server", "-f", f)
	if err == nil || !strings.Contains(err.Error(), "violates PodSecurity") {
		t.Fatalf("a pod injected with --capture init in a restricted namespace: %q, %v; want refused by PodSecurity", out, err)
	}
}

// nodeCapPod is one running pod of a deployment.
type nodeCapPod struct {
	name, uid, ip string
}

// nodeCapPodOf returns the one pod of app that is not being deleted.
func nodeCapPodOf(t *testing.T, ns, app string) nodeCapPod {
	t.Helper()
	var pods []nodeCapPod
	waitFor(t, "one running pod of "+app, time.Minute, func() error {
		out, err := kubectl("-n", ns, "get", "pods", "-l", "app="+app, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.status.podIP} {.status.phase} {.metadata.deletionTimestamp}{"\n"}{end}`)
		if err != nil {
			return err
		}
		pods = nil
		for line := range strings.Lines(out) {
			f := strings.Fields(line)
			if len(f) == 4 && f[3] == "Running" {
				pods = append(pods, nodeCapPod{name: f[0], uid: f[1], ip: f[2]})
			}
		}
		if len(pods) != 1 {
			return fmt.Errorf("%w: %d running pods of %s:\n%s", errNotYet, len(pods), app, out)
		}
		return nil
	})
	return pods[0]
}

// podPID returns a process of the pod (any shares its network namespace),
// found in the pod's cgroup on the host.
func podPID(t *testing.T, uid string) string {
	t.Helper()
	cg := clusterEnv["CLUSTER_CGROUP"]
	var patterns []string
	for _, qos := range []string{"", "burstable/", "besteffort/"} {
		patterns = append(patterns,
			"/sys/fs/cgroup/*/"+cg+"/kubepods/"+qos+"pod"+uid+"/*/cgroup.procs",
			"/sys/fs/cgroup/"+cg+"/kubepods/"+qos+"pod"+uid+"/*/cgroup.procs")
	}
	for _, p := range patterns {
		files, _ := filepath.Glob(p)
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			if pid, _, _ := strings.Cut(string(b), "\n"); pid != "" {
				return pid
			}
		}
	}
	t.Fatalf("no process of pod %s in its cgroups (%s)", uid, patterns[0])
	return ""
}

// netnsRuleset is nft list ruleset in the pod's network namespace.
func netnsRuleset(t *testing.T, uid string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "-n", "-t", podPID(t, uid), "nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset in pod %s's network namespace: %v\n%s", uid, err, out)
	}
	return string(out)
}

// captureInstalled fails t unless the pod's capture is in place: our
// nftables table in its namespace, and for eBPF the programs pinned for
// its cgroup.
func captureInstalled(t *testing.T, mode string, p nodeCapPod) {
	t.Helper()
	if rs := netnsRuleset(t, p.uid); !strings.Contains(rs, "table inet meshproxy") {
		t.Errorf("pod %s (%s): no table inet meshproxy in its network namespace:\n%s", p.name, mode, rs)
	}
	if mode == "ebpf" {
		pins, _ := filepath.Glob("/sys/fs/bpf/meshproxy/pod" + p.uid + "-*")
		if len(pins) == 0 {
			t.Errorf("pod %s (ebpf): no programs pinned for its cgroup in /sys/fs/bpf/meshproxy", p.name)
		}
	}
}

// testNodeCapWire: requests from the client to the server's ClusterIP
// Service arrive at the server pod as TLS whose ClientHello offers ALPN
// istio, never as plaintext; the capture is in both pods' namespaces.
func testNodeCapWire(t *testing.T, mode string) {
	server, client := "server-"+mode, "client-"+mode
	sp, cp := nodeCapPodOf(t, nodeCapNS, server), nodeCapPodOf(t, nodeCapNS, client)
	captureInstalled(t, mode, sp)
	captureInstalled(t, mode, cp)
	// In the server pod's namespace, on its eth0: everything that reaches
	// the pod on the wire, whichever path it took through the node.
	text := "hello from " + server
	url := fmt.Sprintf("http://%s.%s.svc/", server, nodeCapNS)
	flows := captureDuring(t, []string{"nsenter", "-n", "-t", podPID(t, sp.uid), "tcpdump", "-i", "eth0", "-nn", "-s", "0"}, "tcp", cp.ip, sp.ip, func() {
		out, err := kubectl("-n", nodeCapNS, "exec", "deploy/"+client, "-c", "app", "--", "demoapp", "get", url)
		if err != nil || !strings.Contains(out, text) {
			t.Errorf("%s -> %s: %q, %v", client, url, out, err)
		}
	})
	for key, stream := range flows {
		// The kubelet's probes come from the node's address, in plaintext
		// to the sidecar's health port: only the client's flows count.
		if key.src.Addr().String() != cp.ip && key.dst.Addr().String() != cp.ip {
			continue
		}
		if strings.Contains(string(stream), text) || strings.Contains(string(stream), "GET / HTTP") {
			t.Errorf("plaintext HTTP on the wire in %s: %q", key, firstBytes(stream, 200))
		}
		if key.dst.Addr().String() != sp.ip {
			continue
		}
		if h, err := clientHelloOf(stream); err == nil {
			if !slices.Contains(h.SupportedProtos, "istio") {
				t.Errorf("%s: ClientHello ALPN %v, want it to offer istio", key, h.SupportedProtos)
			} else {
				t.Logf("%s: TLS, ClientHello ALPN %v", key, h.SupportedProtos)
			}
		}
	}
	if istioHelloes(flows, cp.ip, sp.ip) == 0 {
		t.Errorf("no TLS connection with ALPN istio from %s (%s) to %s (%s) in the capture (%d flows)", client, cp.ip, server, sp.ip, len(flows))
	}
}

// testNodeCapUninjected: a pod without the injection, on the same node,
// gets no capture — no table of ours in its namespace, and it reaches a
// plaintext server directly — while the STRICT servers refuse it.
func testNodeCapUninjected(t *testing.T) {
	p := nodeCapPodOf(t, nodeCapNS, "plain")
	if rs := netnsRuleset(t, p.uid); strings.Contains(rs, "meshproxy") {
		t.Errorf("the uninjected pod %s has meshproxy rules in its network namespace:\n%s", p.name, rs)
	}
	if pins, _ := filepath.Glob("/sys/fs/bpf/meshproxy/pod" + p.uid + "-*"); len(pins) > 0 {
		t.Errorf("eBPF programs pinned for the uninjected pod %s: %v", p.name, pins)
	}
	url := fmt.Sprintf("http://plain-server.%s.svc/", nodeCapNS)
	if out, err := kubectl("-n", nodeCapNS, "exec", "deploy/plain", "-c", "app", "--", "demoapp", "get", url); err != nil || !strings.Contains(out, "hello from plain-server") {
		t.Errorf("uninjected pod -> plaintext server %s: %q, %v (captured without a sidecar?)", url, out, err)
	}
	for _, mode := range nodeCapModes {
		url := fmt.Sprintf("http://server-%s.%s.svc/", mode, nodeCapNS)
		if out, err := kubectl("-n", nodeCapNS, "exec", "deploy/plain", "-c", "app", "--", "demoapp", "get", "-timeout", "5s", url); err == nil {
			t.Errorf("a plaintext client reached %s under STRICT: %q", url, out)
		}
	}
}

// loopLog returns the client's loop lines (one per request).
func loopLog(t *testing.T, client string) []string {
	t.Helper()
	p := nodeCapPodOf(t, nodeCapNS, client)
	out := mustKubectl(t, "-n", nodeCapNS, "logs", p.name, "-c", "app", "--tail=-1")
	var lines []string
	for l := range strings.Lines(out) {
		if l = strings.TrimSpace(l); strings.HasPrefix(l, "ok ") || strings.HasPrefix(l, "request failed") {
			lines = append(lines, l)
		}
	}
	return lines
}

// testNodeCapAgentRestart: with a held connection and a stream of requests
// through each pair of captured pods, the agent's pod is deleted and its
// replacement becomes ready; no request fails, the held connections finish,
// the servers' peers show the clients' SPIFFE IDs meanwhile, running pods
// keep their capture, and pods created afterwards get capture.
func testNodeCapAgentRestart(t *testing.T) {
	marks := map[string]int{}
	for _, mode := range nodeCapModes {
		client := "client-" + mode
		waitFor(t, client+"'s requests succeeding", time.Minute, func() error {
			lines := loopLog(t, client)
			if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], "ok ") {
				return fmt.Errorf("%w: %s's last requests: %q", errNotYet, client, lines[max(0, len(lines)-3):])
			}
			marks[client] = len(lines)
			return nil
		})
	}
	held := make(chan error, len(nodeCapModes))
	for _, mode := range nodeCapModes {
		go func() {
			url := fmt.Sprintf("http://server-%s.%s.svc/?hold=20s", mode, nodeCapNS)
			out, err := kubectl("-n", nodeCapNS, "exec", "deploy/client-"+mode, "-c", "app", "--", "demoapp", "get", "-timeout", "50s", url)
			if err == nil && !strings.Contains(out, "hello from server-"+mode) {
				err = fmt.Errorf("answer %q", out)
			}
			if err != nil {
				err = fmt.Errorf("held connection client-%s -> %s: %w", mode, url, err)
			}
			held <- err
		}()
	}
	for _, mode := range nodeCapModes {
		id := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/client-%s", nodeCapNS, mode)
		waitFor(t, id+" in server-"+mode+"'s meshproxy peers", 15*time.Second, func() error {
			peers, err := kubectl("-n", nodeCapNS, "exec", "deploy/server-"+mode, "-c", "meshproxy", "--", "meshproxy", "peers")
			if err != nil {
				return err
			}
			if !strings.Contains(peers, id) {
				return fmt.Errorf("%w: peers shows\n%s", errNotYet, peers)
			}
			return nil
		})
	}
	old := strings.Fields(mustKubectl(t, "-n", "kube-system", "get", "pods", "-l", nodeAgentSelector, "-o", "jsonpath={.items[*].metadata.name}"))
	mustKubectl(t, "-n", "kube-system", "delete", "pod", "-l", nodeAgentSelector, "--wait=true", "--timeout=60s")
	waitFor(t, "a new node agent pod ready", 90*time.Second, func() error {
		out, err := kubectl("-n", "kube-system", "get", "pods", "-l", nodeAgentSelector, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err != nil {
			return err
		}
		for l := range strings.Lines(out) {
			if f := strings.Fields(l); len(f) == 2 && !slices.Contains(old, f[0]) && f[1] == "True" {
				return nil
			}
		}
		return fmt.Errorf("%w: agent pods:\n%s", errNotYet, out)
	})
	t.Logf("node agent pod %v deleted; its replacement is ready", old)
	if n := len(held); n > 0 {
		t.Errorf("%d held connections ended before the agent's replacement was ready: the hold does not span the restart", n)
	}
	for range nodeCapModes {
		if err := <-held; err != nil {
			t.Error(err)
		}
	}
	for _, mode := range nodeCapModes {
		client := "client-" + mode
		lines := loopLog(t, client)[marks[client]:]
		failed := 0
		for _, l := range lines {
			if !strings.HasPrefix(l, "ok ") {
				failed++
			}
		}
		// The loop asks twice a second; the restart and the 20s hold span
		// more than twenty requests.
		if failed > 0 || len(lines) < 20 {
			t.Errorf("%s during the agent's restart: %d requests, %d failed: %q", client, len(lines), failed, lines)
		} else {
			t.Logf("%s during the agent's restart: %d requests, none failed", client, len(lines))
		}
		captureInstalled(t, mode, nodeCapPodOf(t, nodeCapNS, "server-"+mode))
		captureInstalled(t, mode, nodeCapPodOf(t, nodeCapNS, client))
	}
	// New sandboxes after the restart: the replacement clients pass their
	// validation (capture in place before they start) and reach the servers.
	for _, mode := range nodeCapModes {
		mustKubectl(t, "-n", nodeCapNS, "rollout", "restart", "deploy/client-"+mode)
	}
	for _, mode := range nodeCapModes {
		mustKubectl(t, "-n", nodeCapNS, "rollout", "status", "deploy/client-"+mode, "--timeout=120s")
		p := nodeCapPodOf(t, nodeCapNS, "client-"+mode)
		captureInstalled(t, mode, p)
		url := fmt.Sprintf("http://server-%s.%s.svc/", mode, nodeCapNS)
		if out, err := kubectl("-n", nodeCapNS, "exec", p.name, "-c", "app", "--", "demoapp", "get", url); err != nil || !strings.Contains(out, "hello from server-"+mode) {
			t.Errorf("new pod %s -> %s: %q, %v", p.name, url, out, err)
		}
	}
}

// uninstallNodeAgent deletes the agent (DaemonSet, RBAC) and runs
// `meshproxy node-agent --uninstall` on the node, as README says, which
// takes the plugin out of the conflist and the bin directory.
func uninstallNodeAgent() error {
	var errs []error
	if _, err := kubectl("-n", "kube-system", "delete", "daemonset", "meshproxy-node-agent", "--ignore-not-found", "--wait=true", "--timeout=55s"); err != nil {
		errs = append(errs, err)
	}
	if _, err := kubectl("delete", "clusterrolebinding,clusterrole", "meshproxy-node-agent", "--ignore-not-found"); err != nil {
		errs = append(errs, err)
	}
	if _, err := kubectl("-n", "kube-system", "delete", "serviceaccount", "meshproxy-node-agent", "--ignore-not-found"); err != nil {
		errs = append(errs, err)
	}
	if meshproxyCLI != "" {
		out, err := exec.Command(meshproxyCLI, "node-agent", "--uninstall", "--bin-dir", nodeCapBinDir, "--conf-dir", nodeCapConfDir()).CombinedOutput()
		if err != nil {
			errs = append(errs, fmt.Errorf("meshproxy node-agent --uninstall: %w\n%s", err, out))
		}
	}
	if _, err := os.Stat(filepath.Join(nodeCapBinDir, "meshproxy-cni")); err == nil {
		errs = append(errs, fmt.Errorf("%s/meshproxy-cni is still there after uninstall", nodeCapBinDir))
	}
	if b, err := os.ReadFile(filepath.Join(nodeCapConfDir(), "10-meshproxy-cluster.conflist")); err == nil && strings.Contains(string(b), "meshproxy-cni") {
		errs = append(errs, fmt.Errorf("meshproxy-cni is still chained after uninstall:\n%s", b))
	}
	return errors.Join(errs...)
}

// testNodeCapAgentRemoved: with the agent removed from the node (DaemonSet
// deleted, plugin uninstalled), running pods keep their capture — the
// client still reaches the STRICT server — and a new injected pod fails its
// validation, saying why, instead of running without capture. The eBPF
// pairs are deleted first, while the plugin's DEL still releases their pins.
func testNodeCapAgentRemoved(t *testing.T) {
	mustKubectl(t, "-n", nodeCapNS, "delete", "deploy", "server-ebpf", "client-ebpf", "--wait=true", "--timeout=60s")
	waitFor(t, "the eBPF pods gone", time.Minute, func() error {
		out, err := kubectl("-n", nodeCapNS, "get", "pods", "-l", "app in (server-ebpf,client-ebpf)", "-o", "name")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "" {
			return fmt.Errorf("%w: %s", errNotYet, out)
		}
		return nil
	})
	if err := uninstallNodeAgent(); err != nil {
		t.Fatal(err)
	}
	server, client := nodeCapPodOf(t, nodeCapNS, "server-nftables"), nodeCapPodOf(t, nodeCapNS, "client-nftables")
	captureInstalled(t, "nftables", server)
	captureInstalled(t, "nftables", client)
	url := fmt.Sprintf("http://server-nftables.%s.svc/", nodeCapNS)
	if out, err := kubectl("-n", nodeCapNS, "exec", client.name, "-c", "app", "--", "demoapp", "get", url); err != nil || !strings.Contains(out, "hello from server-nftables") {
		t.Errorf("after the agent's removal, %s -> %s: %q, %v", client.name, url, out, err)
	}
	mustKubectl(t, "-n", nodeCapNS, "rollout", "restart", "deploy/client-nftables")
	waitFor(t, "the new client pod's validation failing", 90*time.Second, func() error {
		out, err := kubectl("-n", nodeCapNS, "get", "pods", "-l", "app=client-nftables", "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.status.initContainerStatuses[?(@.name=="meshproxy-validation")].lastState.terminated.exitCode}{.status.initContainerStatuses[?(@.name=="meshproxy-validation")].state.terminated.exitCode}{"\n"}{end}`)
		if err != nil {
			return err
		}
		for l := range strings.Lines(out) {
			f := strings.Fields(l)
			if len(f) != 2 || f[0] == client.name || f[1] == "0" {
				continue
			}
			logs, _ := kubectl("-n", nodeCapNS, "logs", f[0], "-c", "meshproxy-validation", "--previous")
			if cur, _ := kubectl("-n", nodeCapNS, "logs", f[0], "-c", "meshproxy-validation"); !strings.Contains(logs, "capture validation failed") {
				logs = cur
			}
			if !strings.Contains(logs, "capture validation failed") {
				return fmt.Errorf("%w: pod %s's validation exited %s, log:\n%s", errNotYet, f[0], f[1], logs)
			}
			t.Logf("new pod %s without the agent: validation exited %s: %s", f[0], f[1], strings.TrimSpace(logs))
			return nil
		}
		return fmt.Errorf("%w: no new client pod whose validation failed:\n%s", errNotYet, out)
	})
}

// removeNodeCapture deletes the namespace (the kubelet's CNI DEL removes
// the pods' capture and eBPF pins while the plugin is still chained), then
// uninstalls the agent if a step failed before doing so.
func removeNodeCapture(t *testing.T) {
	var errs []error
	uids, _ := kubectl("-n", nodeCapNS, "get", "pods", "-o", "jsonpath={.items[*].metadata.uid}")
	if _, err := kubectl("delete", "namespace", nodeCapNS, "--ignore-not-found", "--wait=true", "--timeout=55s"); err != nil {
		errs = append(errs, err)
	}
	for _, uid := range strings.Fields(uids) {
		if pins, _ := filepath.Glob("/sys/fs/bpf/meshproxy/pod" + uid + "-*"); len(pins) > 0 {
			errs = append(errs, fmt.Errorf("eBPF pins of deleted pod %s left on the node: %v", uid, pins))
		}
	}
	if err := uninstallNodeAgent(); err != nil {
		errs = append(errs, err)
	}
	// The plugin's records (cni.DefaultStateDir) of pods deleted after the
	// plugin was uninstalled: no DEL reached it. Their rules went with their
	// network namespaces.
	records := "/run/meshproxy/cni"
	os.RemoveAll(records)
	os.Remove(filepath.Dir(records))
	if err := errors.Join(errs...); err != nil {
		t.Errorf("removing the node capture: %v", err)
	}
}
