package netns_test

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/inject"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// probedPod is an application with its own HTTP readiness and TCP liveness
// probes on its plaintext port, as users write them.
const probedPod = `apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default}
spec:
  containers:
  - name: app
    image: app
    ports: [{name: http, containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /ready, port: http, httpHeaders: [{name: X-Probe, value: kubelet}]}
    livenessProbe:
      tcpSocket: {port: 8080}
`

// TestAppProbesWorkUnderStrict is what the kubelet sees of an injected pod
// under STRICT, for each capture mode inject emits: the app's plaintext
// port is refused from outside the pod, yet the rewritten probes on the
// health port (never captured) reach the app through the sidecar, and fail
// once the app stops.
func TestAppProbesWorkUnderStrict(t *testing.T) {
	netns.RequireRoot(t)
	readyPath, livePath, probers := injectProbes(t)
	t.Setenv(inject.AppProbersEnv, probers) // as the injected sidecar container gets it
	for _, mode := range redirect.Modes {
		t.Run(string(mode), func(t *testing.T) {
			if mode == redirect.ModeEBPF {
				if _, err := netns.Cgroup2Mount(); err != nil {
					t.Skipf("kernel without a cgroup v2 hierarchy: %v", err)
				}
			}
			testAppProbes(t, mode, readyPath, livePath)
		})
	}
}

// injectProbes injects probedPod and returns the app's rewritten readiness
// and liveness paths and the sidecar's MESHPROXY_APP_PROBERS.
func injectProbes(t *testing.T) (ready, live, probers string) {
	t.Helper()
	inj, err := inject.New()
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := inj.Manifest([]byte(probedPod))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(out, &pod); err != nil {
		t.Fatal(err)
	}
	app := pod.Spec.Containers[0]
	for _, p := range []*corev1.Probe{app.ReadinessProbe, app.LivenessProbe} {
		if p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != inject.HealthPort {
			t.Fatalf("probe not rewritten to the health port: %+v", p)
		}
	}
	for _, c := range pod.Spec.InitContainers {
		for _, e := range c.Env {
			if c.Name == inject.SidecarName && e.Name == inject.AppProbersEnv {
				probers = e.Value
			}
		}
	}
	if probers == "" {
		t.Fatalf("the sidecar has no %s", inject.AppProbersEnv)
	}
	return app.ReadinessProbe.HTTPGet.Path, app.LivenessProbe.HTTPGet.Path, probers
}

func testAppProbes(t *testing.T, mode redirect.Mode, readyPath, livePath string) {
	a, b := netns.NewPair(t)
	var cg string
	flags := []string{"--mode", string(mode)}
	if mode == redirect.ModeEBPF {
		cg = netns.NewCgroup(t)
		flags = append(flags, "--cgroup", cg)
	}

	// The app in pod B: HTTP on :8080, noting where each request arrived.
	var ln net.Listener
	if err := b.Do(func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", appPort))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	arrived := make(chan string, 16)
	app := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		select {
		case arrived <- fmt.Sprintf("%s %s %s", r.URL.Path, r.Header.Get("X-Probe"), local):
		default:
		}
		if r.URL.Path != "/ready" {
			w.WriteHeader(http.StatusNotFound)
		}
	})}
	served := make(chan error, 1)
	go func() { served <- app.Serve(ln) }()
	t.Cleanup(func() { _ = app.Close(); <-served })

	if out, err := meshproxy(t, b, append([]string{"redirect", "install"}, flags...)...); err != nil {
		t.Fatalf("redirect install: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = meshproxy(t, b, append([]string{"redirect", "uninstall"}, flags...)...) })
	ca := testpki.New(t, "cluster.local")
	startSidecar(t, b, cg, "STRICT", identityFiles(t, ca, serverID))

	// Pod A has no sidecar: it is the kubelet, and any plaintext client.
	code, _, err := a.HTTPGet(hp(netns.BV4, appPort), "/ready")
	if err == nil && code == http.StatusOK {
		t.Fatal("STRICT served the app's plaintext port to a client outside the mesh")
	}
	for _, ip := range []netip.Addr{netns.BV4, netns.BV6} {
		addr := hp(ip, inject.HealthPort)
		code, body, err := a.HTTPGet(addr, readyPath)
		if err != nil || code != http.StatusOK {
			t.Fatalf("readiness probe %s%s: %d %q %v, want 200", addr, readyPath, code, body, err)
		}
		// The app saw the original probe, on the pod address the kubelet used.
		if got, want := <-arrived, "/ready kubelet "+hp(ip, appPort); got != want {
			t.Errorf("the app saw %q, want %q", got, want)
		}
		if code, body, err := a.HTTPGet(addr, livePath); err != nil || code != http.StatusOK {
			t.Errorf("liveness probe %s%s: %d %q %v, want 200", addr, livePath, code, body, err)
		}
	}

	// The app stops: both probes fail, saying why.
	if err := app.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Fatalf("app: %v", err)
	}
	served <- http.ErrServerClosed // for the cleanup
	for _, path := range []string{readyPath, livePath} {
		code, body, err := a.HTTPGet(hp(netns.BV4, inject.HealthPort), path)
		if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "refused") {
			t.Errorf("probe %s with the app stopped: %d %q %v, want 503 saying the connection was refused", path, code, body, err)
		}
	}
}
