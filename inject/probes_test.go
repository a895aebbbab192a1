//go:build !noinject

package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshproxy/meshproxy/proxy/apphealth"
)

// injectedPod injects src (one Pod) and returns the pod, its sidecar and
// the probers the sidecar is given (validated as the sidecar does).
func injectedPod(t *testing.T, inj *Injector, src string) (*corev1.Pod, *corev1.Container, apphealth.Probers, []byte) {
	t.Helper()
	out, _ := mustInject(t, inj, []byte(src))
	pod := docsOf(t, out)[0].obj.(*corev1.Pod)
	sidecar, ok := container(&pod.Spec, SidecarName)
	if !ok {
		t.Fatal("no sidecar")
	}
	var js string
	for _, e := range sidecar.Env {
		if e.Name == AppProbersEnv {
			js = e.Value
		}
	}
	probers, err := apphealth.Parse([]byte(js))
	if err != nil {
		t.Fatalf("the sidecar would refuse %s=%s: %v", AppProbersEnv, js, err)
	}
	return pod, sidecar, probers, out
}

// healthProbe is what an application probe becomes.
func healthProbe(container, kind string) *corev1.HTTPGetAction {
	return &corev1.HTTPGetAction{Path: "/app-health/" + container + "/" + kind, Port: intstr.FromInt32(HealthPort), Scheme: corev1.URISchemeHTTP}
}

const probePod = `apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo}
spec:
  containers:
  - name: web
    image: web
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9901}]
    readinessProbe:
      httpGet: {path: "/ready?deep=1", port: http, scheme: HTTPS, httpHeaders: [{name: X-Token, value: t}, {name: Host, value: web.local}]}
      initialDelaySeconds: 2
      periodSeconds: 7
      timeoutSeconds: 4
      successThreshold: 2
      failureThreshold: 5
    livenessProbe:
      tcpSocket: {port: 9901}
      terminationGracePeriodSeconds: 12
    startupProbe:
      grpc: {port: 9090, service: orders}
      failureThreshold: 30
  - name: cache
    image: cache
    livenessProbe:
      exec: {command: [redis-cli, ping]}
    readinessProbe:
      httpGet: {path: /, port: 6380, host: 10.0.0.9}
`

func TestProbesAreRewrittenToTheHealthPort(t *testing.T) {
	for _, native := range []bool{true, false} {
		t.Run(map[bool]string{true: "native", false: "regular"}[native], func(t *testing.T) {
			pod, _, probers, _ := injectedPod(t, newInjector(t, WithNativeSidecar(native)), probePod)
			web, _ := container(&pod.Spec, "web")

			// HTTP: the health port, timing fields kept.
			r := web.ReadinessProbe
			if !reflect.DeepEqual(r.HTTPGet, healthProbe("web", "readyz")) || r.TCPSocket != nil || r.GRPC != nil || r.Exec != nil {
				t.Errorf("readiness probe %+v", r.ProbeHandler)
			}
			if r.InitialDelaySeconds != 2 || r.PeriodSeconds != 7 || r.TimeoutSeconds != 4 || r.SuccessThreshold != 2 || r.FailureThreshold != 5 {
				t.Errorf("timing fields lost: %+v", r)
			}
			// TCP and gRPC become HTTP probes of the health port too.
			if l := web.LivenessProbe; !reflect.DeepEqual(l.HTTPGet, healthProbe("web", "livez")) || l.TCPSocket != nil ||
				l.TerminationGracePeriodSeconds == nil || *l.TerminationGracePeriodSeconds != 12 {
				t.Errorf("liveness probe %+v", l)
			}
			if s := web.StartupProbe; !reflect.DeepEqual(s.HTTPGet, healthProbe("web", "startupz")) || s.GRPC != nil || s.FailureThreshold != 30 {
				t.Errorf("startup probe %+v", s)
			}

			// exec probes, and probes of another host, stay as they were.
			cache, _ := container(&pod.Spec, "cache")
			if cache.LivenessProbe.Exec == nil || cache.LivenessProbe.HTTPGet != nil {
				t.Errorf("exec probe changed: %+v", cache.LivenessProbe)
			}
			if g := cache.ReadinessProbe.HTTPGet; g == nil || g.Host != "10.0.0.9" || g.Port.IntValue() != 6380 {
				t.Errorf("probe of another host changed: %+v", cache.ReadinessProbe)
			}

			// The sidecar gets the originals, named ports resolved.
			svc := "orders"
			want := apphealth.Probers{
				"/app-health/web/readyz": {TimeoutSeconds: 4, HTTPGet: &apphealth.HTTPGet{Path: "/ready?deep=1", Port: 8080, Scheme: "HTTPS",
					HTTPHeaders: []apphealth.HTTPHeader{{Name: "X-Token", Value: "t"}, {Name: "Host", Value: "web.local"}}}},
				"/app-health/web/livez":    {TimeoutSeconds: 1, TCPSocket: &apphealth.TCPSocket{Port: 9901}},
				"/app-health/web/startupz": {TimeoutSeconds: 1, GRPC: &apphealth.GRPC{Port: 9090, Service: &svc}},
			}
			if !reflect.DeepEqual(probers, want) {
				a, _ := probers.JSON()
				b, _ := want.JSON()
				t.Errorf("probers\n%s\nwant\n%s", a, b)
			}

			// The annotation keeps the probes exactly as written.
			var orig map[string]map[string]corev1.Probe
			if err := json.Unmarshal([]byte(pod.Annotations[OriginalProbesAnnotation]), &orig); err != nil {
				t.Fatalf("annotation %q: %v", pod.Annotations[OriginalProbesAnnotation], err)
			}
			if g := orig["web"]["readinessProbe"].HTTPGet; g == nil || g.Port.StrVal != "http" || len(g.HTTPHeaders) != 2 {
				t.Errorf("original readiness probe %+v", orig["web"]["readinessProbe"])
			}
			if orig["web"]["livenessProbe"].TCPSocket == nil || orig["web"]["startupProbe"].GRPC == nil || len(orig) != 1 {
				t.Errorf("original probes %+v", orig)
			}
		})
	}
}

func TestProbesOfUserNativeSidecarsAreRewritten(t *testing.T) {
	src := `apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  initContainers:
  - name: setup
    image: s
  - name: logship
    image: l
    restartPolicy: Always
    readinessProbe: {tcpSocket: {port: 24224}}
  containers:
  - {name: app, image: a, readinessProbe: {httpGet: {port: 8080}}}
`
	for _, native := range []bool{true, false} {
		pod, _, probers, _ := injectedPod(t, newInjector(t, WithNativeSidecar(native)), src)
		ls, _ := container(&pod.Spec, "logship")
		if !reflect.DeepEqual(ls.ReadinessProbe.HTTPGet, healthProbe("logship", "readyz")) {
			t.Errorf("native %v: user's native sidecar probe %+v", native, ls.ReadinessProbe)
		}
		if p := probers["/app-health/logship/readyz"]; p.TCPSocket == nil || p.TCPSocket.Port != 24224 {
			t.Errorf("native %v: probers %+v", native, probers)
		}
		if p := probers["/app-health/app/readyz"]; p.HTTPGet == nil || p.HTTPGet.Port != 8080 || p.HTTPGet.Path != "/" || p.HTTPGet.Scheme != "HTTP" {
			t.Errorf("native %v: app prober %+v", native, p.HTTPGet)
		}
	}
}

func TestPodsWithoutRewritableProbesGetNoProbers(t *testing.T) {
	for name, src := range map[string]string{
		"no probes":     "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n",
		"exec only":     "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a, livenessProbe: {exec: {command: [\"true\"]}}}]\n",
		"opted out":     "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.meshproxy.io/rewriteAppProbers: \"false\"}}\nspec:\n  containers: [{name: app, image: a, livenessProbe: {tcpSocket: {port: 80}}}]\n",
		"istio opt-out": "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.istio.io/rewriteAppHTTPProbers: \"false\"}}\nspec:\n  containers: [{name: app, image: a, livenessProbe: {tcpSocket: {port: 80}}}]\n",
		"health port":   "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a, livenessProbe: {httpGet: {port: 15021, path: /healthz/ready}}}]\n",
	} {
		t.Run(name, func(t *testing.T) {
			pod, sidecar, probers, _ := injectedPod(t, newInjector(t), src)
			if len(probers) != 0 || strings.Contains(envNames(sidecar), AppProbersEnv) {
				t.Errorf("probers %v, env %s", probers, envNames(sidecar))
			}
			if _, ok := pod.Annotations[OriginalProbesAnnotation]; ok {
				t.Error("original probes annotation without rewritten probes")
			}
			in := docsOf(t, []byte(src))[0].obj.(*corev1.Pod)
			app, _ := container(&pod.Spec, "app")
			if !reflect.DeepEqual(app.LivenessProbe, in.Spec.Containers[0].LivenessProbe) {
				t.Errorf("probe changed: %+v", app.LivenessProbe)
			}
		})
	}
}

func envNames(c *corev1.Container) string {
	var n []string
	for _, e := range c.Env {
		n = append(n, e.Name)
	}
	return strings.Join(n, ",")
}

func TestReinjectingRestoresTheOriginalProbesFirst(t *testing.T) {
	for name, opts := range map[string][]Option{
		"native":   nil,
		"regular":  {WithNativeSidecar(false)},
		"iptables": {WithMode(ModeIPTables)},
		"ebpf":     {WithMode(ModeEBPF)},
	} {
		t.Run(name, func(t *testing.T) {
			inj := newInjector(t, opts...)
			once, _ := mustInject(t, inj, []byte(probePod))
			twice, _ := mustInject(t, inj, once)
			if !bytes.Equal(once, twice) {
				t.Errorf("second pass changed the manifest:\n%s", firstDiff(once, twice))
			}
		})
	}

	// Switching native → regular gives what a fresh regular injection gives.
	native, _ := mustInject(t, newInjector(t), []byte(probePod))
	switched, _ := mustInject(t, newInjector(t, WithNativeSidecar(false)), native)
	fresh, _ := mustInject(t, newInjector(t, WithNativeSidecar(false)), []byte(probePod))
	if !bytes.Equal(switched, fresh) {
		t.Errorf("re-injection differs from a fresh one:\n%s", firstDiff(fresh, switched))
	}

	// Opting out after injection gives the application its probes back.
	optOut := strings.Replace(string(native), "annotations:\n", "annotations:\n    sidecar.meshproxy.io/rewriteAppProbers: \"false\"\n", 1)
	pod, _, probers, _ := injectedPod(t, newInjector(t), optOut)
	in := docsOf(t, []byte(probePod))[0].obj.(*corev1.Pod)
	if !reflect.DeepEqual(pod.Spec.Containers[0].ReadinessProbe, in.Spec.Containers[0].ReadinessProbe) ||
		!reflect.DeepEqual(pod.Spec.Containers[0].StartupProbe, in.Spec.Containers[0].StartupProbe) || len(probers) != 0 {
		t.Errorf("opt-out after injection: probes %+v, probers %v", pod.Spec.Containers[0].ReadinessProbe, probers)
	}
	if _, ok := pod.Annotations[OriginalProbesAnnotation]; ok {
		t.Error("original probes annotation left behind")
	}
}

func TestAProbeChangedAfterInjectionIsTheNewOriginal(t *testing.T) {
	once, _ := mustInject(t, newInjector(t), []byte(probePod))
	// The user points the rewritten liveness probe at another port.
	edited := strings.Replace(string(once), "path: /app-health/web/livez\n        port: 15021", "path: /live\n        port: 9999", 1)
	if edited == string(once) {
		t.Fatal("rewritten liveness probe not found in the output")
	}
	_, _, probers, _ := injectedPod(t, newInjector(t), edited)
	if l := probers["/app-health/web/livez"]; l.HTTPGet == nil || l.HTTPGet.Path != "/live" || l.HTTPGet.Port != 9999 {
		t.Errorf("liveness prober %+v, want the edited probe", l)
	}
	if r := probers["/app-health/web/readyz"]; r.HTTPGet == nil || r.HTTPGet.Port != 8080 {
		t.Errorf("readiness prober %+v, want the original probe", r)
	}
}

func TestRenamingAContainerAfterInjectionKeepsItsProbes(t *testing.T) {
	once, _ := mustInject(t, newInjector(t), []byte(probePod))
	renamed := strings.Replace(string(once), "    name: web\n    ports:", "    name: frontend\n    ports:", 1)
	if renamed == string(once) {
		t.Fatal("container web not found in the output")
	}
	pod, _, probers, _ := injectedPod(t, newInjector(t), renamed)
	fe, ok := container(&pod.Spec, "frontend")
	if !ok {
		t.Fatal("container frontend missing")
	}
	if !reflect.DeepEqual(fe.ReadinessProbe.HTTPGet, healthProbe("frontend", "readyz")) {
		t.Errorf("readiness probe %+v", fe.ReadinessProbe.HTTPGet)
	}
	if r := probers["/app-health/frontend/readyz"]; r.HTTPGet == nil || r.HTTPGet.Port != 8080 || r.HTTPGet.Path != "/ready?deep=1" {
		t.Errorf("probers %v: want the original readiness probe under the new name", probers)
	}
	if _, ok := probers["/app-health/web/readyz"]; ok {
		t.Error("the old container name is still probed")
	}
}

func TestBadProbesAreErrorsNamingTheField(t *testing.T) {
	pod := func(ctr string) string {
		return "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - " + ctr + "\n"
	}
	for name, tc := range map[string]struct{ src, field, text string }{
		"unknown named port": {pod("{name: app, image: a, readinessProbe: {httpGet: {port: http}}}"),
			"spec.containers[0].readinessProbe.httpGet.port", `named port "http"`},
		"tcp named port": {pod("{name: app, image: a, ports: [{name: web, containerPort: 80}], livenessProbe: {tcpSocket: {port: db}}}"),
			"spec.containers[0].livenessProbe.tcpSocket.port", `named port "db"`},
		"relative path": {pod("{name: app, image: a, startupProbe: {httpGet: {port: 80, path: healthz}}}"),
			"spec.containers[0].startupProbe", "absolute path"},
		"rewritten probe without original": {pod("{name: app, image: a, livenessProbe: {httpGet: {port: 15021, path: /app-health/app/livez}}}"),
			"spec.containers[0].livenessProbe", "no original probe"},
		"bad annotation": {"apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.meshproxy.io/original-probes: nope}}\nspec:\n  containers: [{name: app, image: a}]\n",
			"metadata.annotations[sidecar.meshproxy.io/original-probes]", "original probes JSON"},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := newInjector(t).Manifest([]byte(tc.src))
			de, ok := errors.AsType[*DocumentError](err)
			if !ok {
				t.Fatalf("error %v is not a DocumentError", err)
			}
			if de.Field != tc.field || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("error %q (field %q), want field %q and %q", err, de.Field, tc.field, tc.text)
			}
		})
	}
}
