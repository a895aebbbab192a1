package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// streamPair is a server and a client that requests it five times a second,
// both meshed.
const streamPair = `apiVersion: v1
kind: ServiceAccount
metadata: {name: stream-server, namespace: demo}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: stream-client, namespace: demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: stream-server, namespace: demo, labels: {app: stream-server}}
spec:
  replicas: 1
  selector: {matchLabels: {app: stream-server}}
  template:
    metadata: {labels: {app: stream-server}}
    spec:
      serviceAccountName: stream-server
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["serve", "-listen=:8080", "-text=streamed"]
        ports: [{name: http, containerPort: 8080}]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {name: stream-server, namespace: demo}
spec:
  selector: {app: stream-server}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: stream-client, namespace: demo, labels: {app: stream-client}}
spec:
  replicas: 1
  selector: {matchLabels: {app: stream-client}}
  template:
    metadata: {labels: {app: stream-client}}
    spec:
      serviceAccountName: stream-client
      automountServiceAccountToken: false
      containers:
      - name: app
        image: meshproxy-demo-app:dev
        imagePullPolicy: IfNotPresent
        args: ["loop", "-every=200ms", "-timeout=5s", "http://stream-server.demo.svc/"]
        securityContext: {runAsNonRoot: true, runAsUser: 65532, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
`

var serialRE = regexp.MustCompile(`"serial":\s*"([^"]+)"`)

// leafSerial is the first serial meshproxy identity -o json reports: the
// sidecar's own certificate.
func leafSerial(deploy string) (string, error) {
	out, err := kubectl("-n", "demo", "exec", "deploy/"+deploy, "-c", "meshproxy", "--", "meshproxy", "identity", "-o", "json")
	if err != nil {
		return "", err
	}
	m := serialRE.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("no serial in meshproxy identity -o json:\n%s", out)
	}
	return m[1], nil
}

// rotationRun is item 5 in flight: started early in the suite, checked
// near its end, so its minutes of waiting for rotations overlap the other
// steps (which also load the node while the client streams).
type rotationRun struct {
	start time.Time         // after the client's first success
	first map[string]string // leaf serials then, by Deployment
}

// startRotationUnderLoad (item 5, first half): a client and a server whose
// sidecars have 2-minute certificates, the client requesting five times a
// second; it returns once the client's first request succeeded.
func startRotationUnderLoad(t *testing.T) *rotationRun {
	needCluster(t)
	dumpOnFailure(t, "demo")
	tmp := t.TempDir()
	src := filepath.Join(tmp, "stream.yaml")
	if err := os.WriteFile(src, []byte(streamPair), 0o600); err != nil {
		t.Fatal(err)
	}
	apiIP := strings.TrimSpace(mustKubectl(t, "-n", "default", "get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"))
	out, err := exec.Command(meshproxyCLI, "inject", "-f", src, "--image", "meshproxy:dev",
		"--mesh-cidrs", "10.244.0.0/16,10.96.0.0/16",
		"--exclude-outbound-cidrs", apiIP+"/32,"+clusterEnv["CLUSTER_DNS_IP"]+"/32").Output()
	if err != nil {
		t.Fatalf("inject: %v", err)
	}
	// Short-lived certificates: the sidecars rotate at half-life, every minute.
	injected := regexp.MustCompile(`(?m)^(\s*)- run\n`).ReplaceAllString(string(out), "${1}- run\n${1}- --cert-ttl\n${1}- 2m\n")
	if strings.Count(injected, "--cert-ttl") != 2 {
		t.Fatalf("could not set --cert-ttl on both sidecars:\n%s", injected)
	}
	applyYAML(t, injected)
	for _, d := range []string{"stream-server", "stream-client"} {
		mustKubectl(t, "-n", "demo", "rollout", "status", "deploy/"+d, "--timeout=180s")
	}
	waitFor(t, "the client's first successful request", time.Minute, func() error {
		logs, err := kubectl("-n", "demo", "logs", "deploy/stream-client", "-c", "app")
		if err != nil {
			return err
		}
		if !strings.Contains(logs, "ok 200 streamed") {
			return fmt.Errorf("%w: %s", errNotYet, lastLines(logs, 5))
		}
		return nil
	})
	start := time.Now()
	first := map[string]string{}
	for _, d := range []string{"stream-server", "stream-client"} {
		s, err := leafSerial(d)
		if err != nil {
			t.Fatal(err)
		}
		first[d] = s
	}
	return &rotationRun{start: start, first: first}
}

// checkRotationUnderLoad (item 5, second half): both sidecars rotated at
// least once, over at least 150s (more than one 2-minute lifetime), and not
// one of the client's requests since its first success failed.
func checkRotationUnderLoad(t *testing.T, run *rotationRun) {
	needCluster(t)
	if run == nil {
		t.Fatal("the rotation run did not start (see 5a)")
	}
	dumpOnFailure(t, "demo")
	defer kubectl("-n", "demo", "delete", "deploy/stream-client", "deploy/stream-server", "--wait=false")
	start, first := run.start, run.first
	rotated := map[string]string{}
	waitFor(t, "both sidecars rotate", 4*time.Minute, func() error {
		for d, s0 := range first {
			if s, err := leafSerial(d); err == nil && s != s0 {
				rotated[d] = s
			}
		}
		if len(rotated) < 2 || time.Since(start) < 150*time.Second {
			return fmt.Errorf("%w: rotated %v after %s", errNotYet, rotated, time.Since(start).Round(time.Second))
		}
		return nil
	})
	logs := mustKubectl(t, "-n", "demo", "logs", "deploy/stream-client", "-c", "app", "--since-time="+start.UTC().Format(time.RFC3339))
	// The window starts after the first success; everything since must be ok.
	ok, failed := 0, 0
	for line := range strings.SplitSeq(strings.TrimSpace(logs), "\n") {
		switch {
		case strings.HasPrefix(line, "ok 200"):
			ok++
		case strings.HasPrefix(line, "request failed"):
			failed++
			t.Errorf("failed request during rotation: %s", line)
		}
	}
	t.Logf("serials %v -> %v; %d requests ok, %d failed", first, rotated, ok, failed)
	if ok < 300 {
		t.Errorf("only %d successful requests in %s: the client was not streaming", ok, time.Since(start).Round(time.Second))
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
