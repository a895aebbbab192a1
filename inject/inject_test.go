//go:build !noinject

package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

func newInjector(t *testing.T, opts ...Option) *Injector {
	t.Helper()
	inj, err := New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	return inj
}

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustInject(t *testing.T, inj *Injector, src []byte) ([]byte, []Result) {
	t.Helper()
	out, res, err := inj.Manifest(src)
	if err != nil {
		t.Fatalf("inject: %v", err)
	}
	return out, res
}

// outDoc is one document of an injected manifest, decoded strictly.
type outDoc struct {
	raw  []byte
	kind string
	name string
	obj  any
}

func docsOf(t *testing.T, manifest []byte) []outDoc {
	t.Helper()
	var out []outDoc
	for _, d := range splitDocuments(manifest) {
		j, err := yaml.YAMLToJSONStrict(d.body)
		if err != nil {
			t.Fatalf("output is not YAML: %v\n%s", err, d.body)
		}
		if string(bytes.TrimSpace(j)) == "null" {
			continue
		}
		var head struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(j, &head); err != nil {
			t.Fatal(err)
		}
		od := outDoc{raw: d.body, kind: head.Kind, name: head.Metadata.Name}
		var target any
		switch head.Kind {
		case "Pod":
			target = &corev1.Pod{}
		case "Deployment":
			target = &appsv1.Deployment{}
		case "StatefulSet":
			target = &appsv1.StatefulSet{}
		case "DaemonSet":
			target = &appsv1.DaemonSet{}
		case "ReplicaSet":
			target = &appsv1.ReplicaSet{}
		case "Job":
			target = &batchv1.Job{}
		case "CronJob":
			target = &batchv1.CronJob{}
		case "List":
			target = &corev1.List{}
		case "ConfigMap":
			target = &corev1.ConfigMap{}
		case "Service":
			target = &corev1.Service{}
		default:
			t.Fatalf("unexpected kind %q in output", head.Kind)
		}
		strict, err := kjson.UnmarshalStrict(j, target)
		if err != nil || len(strict) > 0 {
			t.Fatalf("%s %s: output does not decode strictly: %v %v", head.Kind, head.Metadata.Name, err, strict)
		}
		od.obj = target
		out = append(out, od)
	}
	return out
}

// template returns the pod template of a decoded workload.
func template(t *testing.T, obj any) (*metav1.ObjectMeta, *corev1.PodSpec) {
	t.Helper()
	switch o := obj.(type) {
	case *corev1.Pod:
		return &o.ObjectMeta, &o.Spec
	case *appsv1.Deployment:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	case *appsv1.StatefulSet:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	case *appsv1.DaemonSet:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	case *appsv1.ReplicaSet:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	case *batchv1.Job:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec
	case *batchv1.CronJob:
		return &o.Spec.JobTemplate.Spec.Template.ObjectMeta, &o.Spec.JobTemplate.Spec.Template.Spec
	}
	t.Fatalf("%T has no pod template", obj)
	return nil, nil
}

func container(spec *corev1.PodSpec, name string) (*corev1.Container, bool) {
	for _, list := range [][]corev1.Container{spec.InitContainers, spec.Containers} {
		for i := range list {
			if list[i].Name == name {
				return &list[i], true
			}
		}
	}
	return nil, false
}

func volume(t *testing.T, spec *corev1.PodSpec, name string) corev1.Volume {
	t.Helper()
	for _, v := range spec.Volumes {
		if v.Name == name {
			return v
		}
	}
	t.Fatalf("volume %s missing", name)
	return corev1.Volume{}
}

// argValue returns the value after flag in args.
func argValue(args []string, flag string) (string, bool) {
	i := slices.Index(args, flag)
	if i < 0 || i+1 >= len(args) {
		return "", false
	}
	return args[i+1], true
}

// mountDir returns where a volume is mounted in c.
func mountDir(t *testing.T, c *corev1.Container, vol string) string {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == vol {
			if !m.ReadOnly {
				t.Errorf("%s: volume %s mounted writable", c.Name, vol)
			}
			return m.MountPath
		}
	}
	t.Fatalf("%s does not mount %s", c.Name, vol)
	return ""
}

// checkInjected asserts the injected pod spec field by field.
func checkInjected(t *testing.T, meta *metav1.ObjectMeta, spec *corev1.PodSpec, native bool, appContainers []string) {
	t.Helper()
	if len(spec.InitContainers) == 0 || spec.InitContainers[0].Name != InitContainerName {
		t.Fatalf("first init container is not %s: %v", InitContainerName, names(spec.InitContainers))
	}

	// meshproxy-init: capture only, as root with exactly NET_ADMIN + NET_RAW.
	ini := spec.InitContainers[0]
	if ini.Image != "meshproxy:dev" || ini.ImagePullPolicy != corev1.PullIfNotPresent {
		t.Errorf("init image %q pull %q", ini.Image, ini.ImagePullPolicy)
	}
	if !slices.Equal(ini.Args[:4], []string{"redirect", "install", "--mode", "nftables"}) {
		t.Errorf("init args %v", ini.Args)
	}
	if v, _ := argValue(ini.Args, "--proxy-uid"); v != "1337" {
		t.Errorf("init --proxy-uid %q", v)
	}
	sc := ini.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("init container has no capabilities")
	}
	if !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW"}) || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("init capabilities %+v, want add NET_ADMIN+NET_RAW, drop ALL", sc.Capabilities)
	}
	if *sc.RunAsUser != 0 || *sc.RunAsNonRoot || *sc.Privileged || *sc.AllowPrivilegeEscalation || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("init securityContext %+v", sc)
	}
	if ini.ReadinessProbe != nil || ini.RestartPolicy != nil {
		t.Error("init container must be a plain run-to-completion container")
	}

	// The sidecar.
	var sidecar *corev1.Container
	if native {
		if len(spec.InitContainers) < 2 || spec.InitContainers[1].Name != SidecarName {
			t.Fatalf("native sidecar is not the second init container: %v", names(spec.InitContainers))
		}
		sidecar = &spec.InitContainers[1]
		if sidecar.RestartPolicy == nil || *sidecar.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			t.Error("native sidecar needs restartPolicy Always")
		}
	} else {
		last := len(spec.Containers) - 1
		if spec.Containers[last].Name != SidecarName {
			t.Fatalf("sidecar is not the last container: %v", names(spec.Containers))
		}
		sidecar = &spec.Containers[last]
		if sidecar.RestartPolicy != nil {
			t.Error("regular sidecar container must not set restartPolicy")
		}
	}
	if got := slices.DeleteFunc(names(spec.Containers), func(n string) bool { return n == SidecarName }); !slices.Equal(got, appContainers) {
		t.Errorf("application containers %v, want %v in order", got, appContainers)
	}
	a := sidecar.Args
	if a[0] != "run" {
		t.Errorf("sidecar args %v", a)
	}
	for flag, want := range map[string]string{
		"--ca-addr":     DefaultCAAddr(),
		"--inbound":     ":15006",
		"--outbound":    ":15001",
		"--namespace":   "$(POD_NAMESPACE)",
		"--config-dir":  mountDir(t, sidecar, policyVolume),
		"--ca-root":     mountDir(t, sidecar, caRootVolume) + "/root-cert.pem",
		"--token-file":  mountDir(t, sidecar, tokenVolume) + "/istio-token",
		"--labels-file": mountDir(t, sidecar, podinfoVolume) + "/labels",
	} {
		if got, _ := argValue(a, flag); got != want {
			t.Errorf("sidecar %s = %q, want %q", flag, got, want)
		}
	}
	ssc := sidecar.SecurityContext
	if *ssc.RunAsUser != 1337 || *ssc.RunAsGroup != 1337 || !*ssc.RunAsNonRoot || !*ssc.ReadOnlyRootFilesystem ||
		*ssc.AllowPrivilegeEscalation || *ssc.Privileged || len(ssc.Capabilities.Add) != 0 ||
		!slices.Equal(ssc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("sidecar securityContext %+v", ssc)
	}
	rp := sidecar.ReadinessProbe
	if rp == nil || rp.HTTPGet == nil || rp.HTTPGet.Path != "/healthz/ready" || rp.HTTPGet.Port.IntValue() != 15021 {
		t.Errorf("readiness probe %+v", rp)
	}
	ports := map[int32]string{}
	for _, p := range sidecar.Ports {
		ports[p.ContainerPort] = p.Name
	}
	if ports[15020] == "" || ports[15021] == "" {
		t.Errorf("ports %v: 15020 and 15021 must be named", sidecar.Ports)
	}
	if sidecar.Resources.Requests.Cpu().IsZero() || sidecar.Resources.Requests.Memory().IsZero() {
		t.Errorf("sidecar requests %v", sidecar.Resources.Requests)
	}
	if !slices.ContainsFunc(sidecar.Env, func(e corev1.EnvVar) bool {
		return e.Name == "POD_NAMESPACE" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace"
	}) {
		t.Errorf("env %+v lacks POD_NAMESPACE from metadata.namespace", sidecar.Env)
	}

	// Volumes.
	tok := volume(t, spec, tokenVolume)
	if tok.Projected == nil || len(tok.Projected.Sources) != 1 || tok.Projected.Sources[0].ServiceAccountToken == nil {
		t.Fatalf("token volume %+v", tok)
	}
	if s := tok.Projected.Sources[0].ServiceAccountToken; s.Audience != "istio-ca" || *s.ExpirationSeconds != 43200 || s.Path != "istio-token" {
		t.Errorf("projected token %+v", s)
	}
	pi := volume(t, spec, podinfoVolume)
	if pi.DownwardAPI == nil || len(pi.DownwardAPI.Items) != 1 || pi.DownwardAPI.Items[0].Path != "labels" ||
		pi.DownwardAPI.Items[0].FieldRef.FieldPath != "metadata.labels" {
		t.Errorf("podinfo volume %+v", pi)
	}
	ca := volume(t, spec, caRootVolume)
	if ca.ConfigMap == nil || ca.ConfigMap.Name != "meshproxy-ca-root" || ca.ConfigMap.Optional != nil ||
		!slices.Equal(ca.ConfigMap.Items, []corev1.KeyToPath{{Key: "root-cert.pem", Path: "root-cert.pem"}}) {
		t.Errorf("ca root volume %+v", ca)
	}
	pol := volume(t, spec, policyVolume)
	if pol.ConfigMap == nil || pol.ConfigMap.Name != "meshproxy-policy" || pol.ConfigMap.Optional == nil || !*pol.ConfigMap.Optional {
		t.Errorf("policy volume %+v", pol)
	}

	// Annotations and label.
	var st status
	if err := json.Unmarshal([]byte(meta.Annotations[StatusAnnotation]), &st); err != nil || st.Version != "dev" {
		t.Errorf("status annotation %q: %v", meta.Annotations[StatusAnnotation], err)
	}
	if meta.Annotations["prometheus.io/scrape"] != "true" || meta.Annotations["prometheus.io/path"] != "/stats/prometheus" ||
		(meta.Annotations["prometheus.io/port"] != "15020" && meta.Annotations["prometheus.io/port"] != "9090") {
		t.Errorf("prometheus annotations %v", meta.Annotations)
	}
	if meta.Labels[InjectedLabel] != "true" {
		t.Errorf("labels %v lack %s", meta.Labels, InjectedLabel)
	}
	if meta.Annotations["kubectl.kubernetes.io/default-container"] != appContainers[0] {
		t.Errorf("default container %q, want %q", meta.Annotations["kubectl.kubernetes.io/default-container"], appContainers[0])
	}
}

func names(cs []corev1.Container) []string {
	var n []string
	for _, c := range cs {
		n = append(n, c.Name)
	}
	return n
}

func TestInjectsEveryWorkloadKind(t *testing.T) {
	for _, native := range []bool{true, false} {
		t.Run(map[bool]string{true: "native", false: "regular"}[native], func(t *testing.T) {
			out, results := mustInject(t, newInjector(t, WithNativeSidecar(native)), readTestdata(t, "workloads.yaml"))
			var got []string
			for _, r := range results {
				got = append(got, r.String())
			}
			want := []string{
				"document 3: Deployment demo/web: injected",
				"document 4: StatefulSet demo/db: injected",
				"document 5: DaemonSet demo/agent: injected",
				"document 6: ReplicaSet demo/rs: injected",
				"document 7: Job demo/once: injected",
				"document 8: CronJob demo/nightly: injected",
				"document 9: Pod demo/single: injected",
				`document 10: Deployment demo/legacy: skipped: opted out (annotation sidecar.istio.io/inject: "false")`,
				"document 11 items[1]: Deployment demo/listed: injected",
				`document 12: Pod demo/opted-out: skipped: opted out (label sidecar.meshproxy.io/inject: "false")`,
			}
			if !slices.Equal(got, want) {
				t.Errorf("results:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
			apps := map[string][]string{"web": {"web"}, "db": {"db"}, "agent": {"agent"}, "rs": {"rs"},
				"once": {"once"}, "nightly": {"nightly"}, "single": {"app"}}
			checked := 0
			for _, d := range docsOf(t, out) {
				switch {
				case d.kind == "List":
					l := d.obj.(*corev1.List)
					var dep appsv1.Deployment
					if err := json.Unmarshal(l.Items[1].Raw, &dep); err != nil {
						t.Fatal(err)
					}
					checkInjected(t, &dep.Spec.Template.ObjectMeta, &dep.Spec.Template.Spec, native, []string{"listed"})
					checked++
				case apps[d.name] != nil && d.kind != "Service":
					meta, spec := template(t, d.obj)
					checkInjected(t, meta, spec, native, apps[d.name])
					checked++
				}
			}
			if checked != 8 {
				t.Errorf("checked %d injected workloads, want 8", checked)
			}
		})
	}
}

func TestInjectionKeepsTheWorkloadsOwnFields(t *testing.T) {
	src := readTestdata(t, "workloads.yaml")
	out, _ := mustInject(t, newInjector(t), src)
	in, outd := docsOf(t, src), docsOf(t, out)
	var before, after *appsv1.Deployment
	for i := range in {
		if in[i].kind == "Deployment" && in[i].name == "web" {
			before, after = in[i].obj.(*appsv1.Deployment), outd[i].obj.(*appsv1.Deployment)
		}
	}
	if before == nil {
		t.Fatal("web Deployment not found")
	}
	// Everything outside the pod template is unchanged.
	if !reflect.DeepEqual(before.ObjectMeta, after.ObjectMeta) || before.Spec.Replicas == nil ||
		*before.Spec.Replicas != *after.Spec.Replicas || !reflect.DeepEqual(before.Spec.Selector, after.Spec.Selector) {
		t.Error("deployment metadata or spec changed outside the pod template")
	}
	bs, as := before.Spec.Template.Spec, after.Spec.Template.Spec
	if as.ServiceAccountName != bs.ServiceAccountName {
		t.Error("serviceAccountName lost")
	}
	// The application's containers, init containers and volumes are kept
	// as they were, in their order, after ours.
	if !reflect.DeepEqual(as.Containers, bs.Containers) {
		t.Errorf("application containers changed:\n%+v\n%+v", bs.Containers, as.Containers)
	}
	if !reflect.DeepEqual(as.InitContainers[2:], bs.InitContainers) {
		t.Errorf("application init containers changed: %v", names(as.InitContainers))
	}
	if !reflect.DeepEqual(as.Volumes[:len(bs.Volumes)], bs.Volumes) {
		t.Error("application volumes changed")
	}
	for k, v := range before.Spec.Template.Annotations {
		if after.Spec.Template.Annotations[k] != v {
			t.Errorf("annotation %s lost", k)
		}
	}
	for k, v := range before.Spec.Template.Labels {
		if after.Spec.Template.Labels[k] != v {
			t.Errorf("label %s lost", k)
		}
	}
}

func TestApplicationPrometheusAnnotationsWin(t *testing.T) {
	out, _ := mustInject(t, newInjector(t), readTestdata(t, "workloads.yaml"))
	for _, d := range docsOf(t, out) {
		if d.name == "single" {
			meta, _ := template(t, d.obj)
			if meta.Annotations["prometheus.io/port"] != "9090" || meta.Annotations["prometheus.io/path"] != "/stats/prometheus" {
				t.Errorf("annotations %v: the app's port must stay, the missing path is added", meta.Annotations)
			}
			return
		}
	}
	t.Fatal("pod single not found")
}

func TestUntouchedDocumentsComeOutByteIdentical(t *testing.T) {
	src := readTestdata(t, "workloads.yaml")
	out, _ := mustInject(t, newInjector(t), src)
	in, outDocs := splitDocuments(src), splitDocuments(out)
	if len(in) != len(outDocs) {
		t.Fatalf("%d documents in, %d out", len(in), len(outDocs))
	}
	untouched := 0
	for i := range in {
		if !bytes.Equal(in[i].sep, outDocs[i].sep) {
			t.Errorf("separator %d changed: %q -> %q", i, in[i].sep, outDocs[i].sep)
		}
		body := string(in[i].body)
		if strings.Contains(body, "kind: ConfigMap") && !strings.Contains(body, "kind: List") ||
			strings.Contains(body, "kind: Service") || strings.Contains(body, "opted-out") ||
			strings.Contains(body, "legacy") || !strings.Contains(body, "kind:") {
			untouched++
			if !bytes.Equal(in[i].body, outDocs[i].body) {
				t.Errorf("document %d changed:\n%s\n---\n%s", i, in[i].body, outDocs[i].body)
			}
		}
	}
	if untouched != 5 {
		t.Errorf("compared %d untouched documents, want 5", untouched)
	}
	// A manifest with nothing to inject comes out exactly as it went in.
	plain := []byte("# just config\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v} # keep\n--- # two\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n")
	if got, _ := mustInject(t, newInjector(t), plain); !bytes.Equal(got, plain) {
		t.Errorf("nothing to inject, yet output differs:\n%s", got)
	}
}

func TestListItemsNotInjectedStaySemanticallyIdentical(t *testing.T) {
	src := readTestdata(t, "workloads.yaml")
	out, _ := mustInject(t, newInjector(t), src)
	item := func(manifest []byte) map[string]any {
		for _, d := range docsOf(t, manifest) {
			if d.kind == "List" {
				var m map[string]any
				if err := json.Unmarshal(d.obj.(*corev1.List).Items[0].Raw, &m); err != nil {
					t.Fatal(err)
				}
				return m
			}
		}
		t.Fatal("no List")
		return nil
	}
	if a, b := item(src), item(out); !reflect.DeepEqual(a, b) {
		t.Errorf("ConfigMap in the List changed:\n%v\n%v", a, b)
	}
}

func TestSecondPassIsByteIdentical(t *testing.T) {
	cidrs := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}
	for name, opts := range map[string][]Option{
		"defaults":  nil,
		"regular":   {WithNativeSidecar(false)},
		"all flags": {WithMeshCIDRs(cidrs...), WithExcludeOutboundCIDRs(netip.MustParsePrefix("10.96.0.1/32")), WithExcludeInboundPorts(9000, 9001), WithProxyUID(2000), WithImage("example.com/meshproxy:v1")},
		"ebpf":      {WithMode(ModeEBPF)},
		"iptables":  {WithMode(ModeIPTables)},
	} {
		t.Run(name, func(t *testing.T) {
			inj := newInjector(t, opts...)
			once, _ := mustInject(t, inj, readTestdata(t, "workloads.yaml"))
			twice, _ := mustInject(t, inj, once)
			if !bytes.Equal(once, twice) {
				t.Errorf("second pass changed the manifest:\n%s", firstDiff(once, twice))
			}
		})
	}
}

func TestReinjectingWithNewOptionsReplacesTheOldInjection(t *testing.T) {
	src := readTestdata(t, "workloads.yaml")
	old, _ := mustInject(t, newInjector(t, WithImage("meshproxy:old"), WithNativeSidecar(false), WithMode(ModeEBPF)), src)
	upgraded, _ := mustInject(t, newInjector(t, WithImage("meshproxy:new")), old)
	direct, _ := mustInject(t, newInjector(t, WithImage("meshproxy:new")), src)
	if !bytes.Equal(upgraded, direct) {
		t.Errorf("re-injection differs from a fresh one:\n%s", firstDiff(direct, upgraded))
	}
	if bytes.Contains(upgraded, []byte("meshproxy:old")) || bytes.Contains(upgraded, []byte(cgroupVolume)) {
		t.Error("leftovers of the first injection")
	}
}

func firstDiff(a, b []byte) string {
	al, bl := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	for i := range min(len(al), len(bl)) {
		if al[i] != bl[i] {
			return "line " + itoa(i+1) + ":\n- " + al[i] + "\n+ " + bl[i]
		}
	}
	return "lengths differ: " + itoa(len(al)) + " vs " + itoa(len(bl)) + " lines"
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

func TestOptOutAndUninjectablePodsAreLeftAlone(t *testing.T) {
	pod := func(meta, spec string) string {
		return "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n" + meta + "spec:\n" + spec + "  containers:\n  - {name: app, image: app}\n"
	}
	for name, tc := range map[string]struct {
		src, reason string
	}{
		"meshproxy annotation": {pod("  annotations: {sidecar.meshproxy.io/inject: \"false\"}\n", ""), "opted out (annotation sidecar.meshproxy.io/inject"},
		"istio annotation":     {pod("  annotations: {sidecar.istio.io/inject: \"False\"}\n", ""), "opted out (annotation sidecar.istio.io/inject"},
		"istio label":          {pod("  labels: {sidecar.istio.io/inject: \"false\"}\n", ""), "opted out (label sidecar.istio.io/inject"},
		"host network":         {pod("", "  hostNetwork: true\n"), "hostNetwork"},
		"istio injected":       {pod("  annotations: {sidecar.istio.io/status: \"{}\"}\n", ""), "already has an Istio sidecar"},
	} {
		t.Run(name, func(t *testing.T) {
			out, res := mustInject(t, newInjector(t), []byte(tc.src))
			if string(out) != tc.src {
				t.Errorf("changed:\n%s", out)
			}
			if len(res) != 1 || res[0].Injected || !strings.Contains(res[0].Reason, tc.reason) {
				t.Errorf("results %+v, want skipped with %q", res, tc.reason)
			}
		})
	}
	// inject: "true" is no opt-out.
	_, res := mustInject(t, newInjector(t), []byte(pod("  annotations: {sidecar.meshproxy.io/inject: \"true\"}\n", "")))
	if len(res) != 1 || !res[0].Injected {
		t.Errorf("inject: true not injected: %+v", res)
	}
}

func TestMalformedManifestErrorNamesDocumentAndField(t *testing.T) {
	const cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
	for name, tc := range map[string]struct {
		src         string
		doc, line   int
		field, text string
	}{
		"unknown field": {
			src: cm + "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: demo}\nspec:\n  template:\n    spec:\n      containres: []\n      containers: [{name: a, image: a}]\n",
			doc: 2, line: 5, field: "spec.template.spec.containres", text: "unknown field",
		},
		"unknown container field": {
			src: cm + "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: a, imagePolicy: Always}\n",
			doc: 2, line: 5, field: "spec.containers[0].imagePolicy", text: "unknown field",
		},
		"wrong type": {
			src: cm + "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - {name: a, image: a, ports: [{containerPort: http}]}\n",
			doc: 2, line: 5, field: "spec.containers.ports.containerPort", text: "cannot decode a string into int32",
		},
		"duplicate key": {
			src: cm + "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: []\n  containers: []\n",
			doc: 2, line: 5, text: "line 10",
		},
		"yaml syntax": {
			src: cm + "apiVersion: v1\nkind: Pod\nmetadata: {name: p\n",
			doc: 2, line: 5, text: "yaml",
		},
		"missing kind": {
			src: cm + "apiVersion: v1\nmetadata: {name: p}\n",
			doc: 2, line: 5, field: "kind", text: "missing",
		},
		"not an object": {
			src: cm + "- a\n- b\n",
			doc: 2, line: 5, text: "not a Kubernetes object",
		},
		"old apiVersion": {
			src: "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: d}\n",
			doc: 1, line: 1, field: "apiVersion", text: "not supported",
		},
		"list item": {
			src: "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n  spec: {containers: [{name: a, image: a}], hostNetwrok: true}\n",
			doc: 1, line: 1, field: "items[0].spec.hostNetwrok", text: "unknown field",
		},
		"no containers": {
			src: "apiVersion: batch/v1\nkind: Job\nmetadata: {name: j}\nspec: {template: {spec: {restartPolicy: Never}}}\n",
			doc: 1, line: 1, field: "spec.template.spec.containers", text: "no containers",
		},
		"reserved name": {
			src: "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}, {name: meshproxy, image: b}]\n",
			doc: 1, line: 1, field: "spec.containers[1].name", text: "reserved for meshproxy",
		},
		"bad status annotation": {
			src: "apiVersion: v1\nkind: Pod\nmetadata: {name: p, annotations: {sidecar.meshproxy.io/status: nope}}\nspec:\n  containers: [{name: app, image: a}]\n",
			doc: 1, line: 1, field: "metadata.annotations[sidecar.meshproxy.io/status]", text: "status JSON",
		},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := newInjector(t).Manifest([]byte(tc.src))
			if err == nil {
				t.Fatal("accepted")
			}
			de, ok := errors.AsType[*DocumentError](err)
			if !ok {
				t.Fatalf("%T %v is not a DocumentError", err, err)
			}
			if de.Document != tc.doc || de.Line != tc.line || de.Field != tc.field {
				t.Errorf("document %d line %d field %q, want %d, %d, %q (%v)", de.Document, de.Line, de.Field, tc.doc, tc.line, tc.field, err)
			}
			if !strings.Contains(err.Error(), tc.text) || !strings.Contains(err.Error(), "document "+itoa(tc.doc)) {
				t.Errorf("error %q does not say %q and the document", err, tc.text)
			}
			if tc.field != "" && !strings.Contains(err.Error(), tc.field) {
				t.Errorf("error %q does not name the field %s", err, tc.field)
			}
		})
	}
}

func TestEBPFModeGetsTheCgroupAndBPFPrivileges(t *testing.T) {
	out, _ := mustInject(t, newInjector(t, WithMode(ModeEBPF)), []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	_, spec := template(t, docsOf(t, out)[0].obj)
	ini, _ := container(spec, InitContainerName)
	sc := ini.SecurityContext
	if !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "NET_RAW", "BPF", "SYS_ADMIN"}) {
		t.Errorf("capabilities %v", sc.Capabilities.Add)
	}
	if sc.AllowPrivilegeEscalation != nil {
		t.Error("allowPrivilegeEscalation: false with SYS_ADMIN is refused by the API server")
	}
	if *sc.Privileged {
		t.Error("ebpf init must not be privileged")
	}
	cg, _ := argValue(ini.Args, "--cgroup")
	if cg != DefaultEBPFCgroup || !strings.HasPrefix(cg, mountDir(t, ini, cgroupVolume)+"/") {
		t.Errorf("--cgroup %q is not below the host cgroup mount", cg)
	}
	if !slices.ContainsFunc(ini.Env, func(e corev1.EnvVar) bool {
		return e.Name == "POD_UID" && e.ValueFrom.FieldRef.FieldPath == "metadata.uid"
	}) {
		t.Error("POD_UID missing")
	}
	if v := volume(t, spec, cgroupVolume); v.HostPath == nil || v.HostPath.Path != "/sys/fs/cgroup" {
		t.Errorf("cgroup volume %+v", v)
	}
	if v := volume(t, spec, bpffsVolume); v.HostPath == nil || v.HostPath.Path != "/sys/fs/bpf" {
		t.Errorf("bpffs volume %+v", v)
	}
	sidecar, _ := container(spec, SidecarName)
	if len(sidecar.SecurityContext.Capabilities.Add) != 0 {
		t.Error("the sidecar gains no privileges in ebpf mode")
	}
	// Other modes have none of it.
	out, _ = mustInject(t, newInjector(t), []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	if bytes.Contains(out, []byte("hostPath")) || bytes.Contains(out, []byte("--cgroup")) {
		t.Error("nftables mode got ebpf privileges")
	}
}

func TestOptionsArePassedThrough(t *testing.T) {
	inj := newInjector(t,
		WithImage("registry.example/meshproxy:v2"),
		WithCAAddr("ca.example:443"),
		WithMeshCIDRs(netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")),
		WithExcludeInboundPorts(22, 9090),
		WithExcludeOutboundCIDRs(netip.MustParsePrefix("169.254.169.254/32")),
		WithMode(ModeIPTables),
		WithProxyUID(4242),
		WithVersion("v1.2.3"),
	)
	out, _ := mustInject(t, inj, []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	meta, spec := template(t, docsOf(t, out)[0].obj)
	ini, _ := container(spec, InitContainerName)
	sc, _ := container(spec, SidecarName)
	for _, c := range []struct {
		args       []string
		flag, want string
	}{
		{ini.Args, "--mode", "iptables"},
		{ini.Args, "--proxy-uid", "4242"},
		{ini.Args, "--exclude-inbound-ports", "22,9090"},
		{ini.Args, "--exclude-outbound-cidrs", "169.254.169.254/32"},
		{sc.Args, "--ca-addr", "ca.example:443"},
		{sc.Args, "--mesh-cidrs", "10.0.0.0/8,fd00::/8"},
	} {
		if got, _ := argValue(c.args, c.flag); got != c.want {
			t.Errorf("%s = %q, want %q", c.flag, got, c.want)
		}
	}
	if v, m := volume(t, spec, xtablesVolume), ini.VolumeMounts; v.EmptyDir == nil || len(m) != 1 || m[0].MountPath != "/run" || m[0].ReadOnly {
		t.Errorf("iptables mode needs a writable /run for xtables.lock: %+v %+v", v, ini.VolumeMounts)
	}
	if !*ini.SecurityContext.ReadOnlyRootFilesystem {
		t.Error("iptables mode must keep the root filesystem read-only")
	}
	if ini.Image != "registry.example/meshproxy:v2" || sc.Image != ini.Image {
		t.Errorf("images %q %q", ini.Image, sc.Image)
	}
	if *sc.SecurityContext.RunAsUser != 4242 || *sc.SecurityContext.RunAsGroup != 4242 {
		t.Error("proxy uid not applied to the sidecar")
	}
	if !strings.Contains(meta.Annotations[StatusAnnotation], `"version":"v1.2.3"`) {
		t.Errorf("status %q lacks the version", meta.Annotations[StatusAnnotation])
	}
	// No --mesh-cidrs flag at all when none are given.
	out, _ = mustInject(t, newInjector(t), []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	if bytes.Contains(out, []byte("--mesh-cidrs")) || bytes.Contains(out, []byte("--exclude-")) {
		t.Error("empty lists must not become flags")
	}
}

func TestConfigServerReplacesThePolicyConfigMap(t *testing.T) {
	inj := newInjector(t, WithConfigServer("meshproxy-ca.istio-system.svc:15011"))
	out, _ := mustInject(t, inj, []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	_, spec := template(t, docsOf(t, out)[0].obj)
	sc, _ := container(spec, SidecarName)
	if got, _ := argValue(sc.Args, "--config-server"); got != "meshproxy-ca.istio-system.svc:15011" {
		t.Errorf("--config-server = %q", got)
	}
	i := slices.IndexFunc(sc.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == policyVolume })
	if i < 0 || sc.VolumeMounts[i].ReadOnly {
		t.Fatalf("mounts %+v: want the policy volume mounted writable (the sidecar writes the mirrored policy)", sc.VolumeMounts)
	}
	if got, _ := argValue(sc.Args, "--config-dir"); got != sc.VolumeMounts[i].MountPath {
		t.Errorf("--config-dir = %q, want the policy mount %q", got, sc.VolumeMounts[i].MountPath)
	}
	if v := volume(t, spec, policyVolume); v.EmptyDir == nil || v.ConfigMap != nil {
		t.Errorf("policy volume %+v, want an emptyDir", v)
	}
	if _, err := New(WithConfigServer("no-port")); err == nil {
		t.Error("config server without port accepted")
	}
}

// A sidecar injected for a CA that signs CSRs as they are (--signer
// certmanager) names spiffe://TD/ns/NS/sa/SA in its CSR: the kubelet expands
// the two variables from the downward API of the pod's own fields.
func TestCSRTrustDomainNamesThePodsIdentity(t *testing.T) {
	pod := []byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  serviceAccountName: web\n  containers: [{name: app, image: a}]\n")
	out, _ := mustInject(t, newInjector(t, WithCSRTrustDomain("mesh.example")), pod)
	_, spec := template(t, docsOf(t, out)[0].obj)
	sc, _ := container(spec, SidecarName)
	got, _ := argValue(sc.Args, "--ca-spiffe-id")
	if want := "spiffe://mesh.example/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)"; got != want {
		t.Fatalf("--ca-spiffe-id = %q, want %q", got, want)
	}
	fields := map[string]string{}
	for _, e := range sc.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			fields[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	if fields["POD_NAMESPACE"] != "metadata.namespace" || fields["POD_SERVICE_ACCOUNT"] != "spec.serviceAccountName" {
		t.Errorf("sidecar env %+v: want POD_NAMESPACE and POD_SERVICE_ACCOUNT from the pod's namespace and service account", sc.Env)
	}
	out, _ = mustInject(t, newInjector(t), pod)
	if bytes.Contains(out, []byte("--ca-spiffe-id")) || bytes.Contains(out, []byte("POD_SERVICE_ACCOUNT")) {
		t.Error("--ca-spiffe-id injected without WithCSRTrustDomain")
	}
	for _, bad := range []string{"", "spiffe://mesh.example", "Mesh.Example", "mesh example"} {
		if _, err := New(WithCSRTrustDomain(bad)); err == nil {
			t.Errorf("trust domain %q accepted", bad)
		}
	}
}

func TestDefaultImageFollowsTheVersion(t *testing.T) {
	for v, want := range map[string]string{"dev": "meshproxy:dev", "": "meshproxy:dev", "v0.3.0": "ghcr.io/meshproxy/meshproxy:v0.3.0"} {
		if got := DefaultImage(v); got != want {
			t.Errorf("DefaultImage(%q) = %q, want %q", v, got, want)
		}
	}
}

func TestInvalidOptionsAreRefused(t *testing.T) {
	for name, opts := range map[string][]Option{
		"empty image":        {WithImage("")},
		"image with space":   {WithImage("a b")},
		"ca addr no port":    {WithCAAddr("meshproxy-ca")},
		"ca addr bad port":   {WithCAAddr("ca:0")},
		"ca addr no host":    {WithCAAddr(":15012")},
		"mesh host bits":     {WithMeshCIDRs(netip.MustParsePrefix("10.0.0.1/8"))},
		"mesh invalid":       {WithMeshCIDRs(netip.Prefix{})},
		"exclude port 0":     {WithExcludeInboundPorts(0)},
		"uid 0":              {WithProxyUID(0)},
		"uid negative":       {WithProxyUID(-5)},
		"mode":               {WithMode("pf")},
		"cgroup outside":     {WithMode(ModeEBPF), WithEBPFCgroup("/sys/fs/cgroup")},
		"cgroup escapes":     {WithMode(ModeEBPF), WithEBPFCgroup(hostCgroupMount + "/../../etc")},
		"cgroup not in ebpf": {WithEBPFCgroup(hostCgroupMount + "/kubepods")},
		"empty version":      {WithVersion("")},
	} {
		if _, err := New(opts...); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestParseListsOfFlagValues(t *testing.T) {
	p, err := ParsePrefixes([]string{"10.0.0.0/8, 192.168.0.0/16", "10.0.0.0/8", "", "fd00::/8"})
	if err != nil || len(p) != 3 {
		t.Errorf("ParsePrefixes = %v, %v", p, err)
	}
	for _, bad := range []string{"10.0.0.0", "10.0.0.1/8", "nope", "10.0.0.0/33"} {
		if _, err := ParsePrefixes([]string{bad}); err == nil || !strings.Contains(err.Error(), bad) {
			t.Errorf("ParsePrefixes(%q) = %v, want an error naming it", bad, err)
		}
	}
	ports, err := ParsePorts([]string{"22,9090", "22"})
	if err != nil || !slices.Equal(ports, []uint16{22, 9090}) {
		t.Errorf("ParsePorts = %v, %v", ports, err)
	}
	for _, bad := range []string{"0", "65536", "http", "-1"} {
		if _, err := ParsePorts([]string{bad}); err == nil {
			t.Errorf("ParsePorts(%q) accepted", bad)
		}
	}
}

func TestEmptyAndCommentOnlyManifests(t *testing.T) {
	for _, src := range []string{"", "\n", "# nothing\n", "---\n---\n", "---\n# only a comment\n"} {
		out, res, err := newInjector(t).Manifest([]byte(src))
		if err != nil || string(out) != src || len(res) != 0 {
			t.Errorf("%q -> %q %v %v", src, out, res, err)
		}
	}
}

func TestCommentsBeforeAnInjectedDocumentAreKept(t *testing.T) {
	src := "# the web pod\n\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"
	out, _ := mustInject(t, newInjector(t), []byte(src))
	if !strings.HasPrefix(string(out), "# the web pod\n\napiVersion: v1\n") {
		t.Errorf("leading comment lost:\n%s", out)
	}
}
