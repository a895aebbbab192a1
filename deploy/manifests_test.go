package deploy

import (
	"bytes"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/ca/mirror"
	"github.com/meshproxy/meshproxy/inject"
	"github.com/meshproxy/meshproxy/policy"
)

const kubeDir = "kubernetes"

// kustomization is the subset of kustomize's Kustomization we use, strict.
type kustomization struct {
	APIVersion       string   `json:"apiVersion"`
	Kind             string   `json:"kind"`
	Namespace        string   `json:"namespace,omitempty"`
	Resources        []string `json:"resources,omitempty"`
	GeneratorOptions *struct {
		DisableNameSuffixHash bool `json:"disableNameSuffixHash"`
	} `json:"generatorOptions,omitempty"`
	// Patches are inline JSON 6902 patches of one target each.
	Patches []struct {
		Target struct {
			Kind string `json:"kind"`
			Name string `json:"name"`
		} `json:"target"`
		Patch string `json:"patch"`
	} `json:"patches,omitempty"`
	ConfigMapGenerator []struct {
		Name      string   `json:"name"`
		Namespace string   `json:"namespace,omitempty"`
		Files     []string `json:"files"`
	} `json:"configMapGenerator,omitempty"`
}

// manifestFiles lists every YAML file under deploy/kubernetes.
func manifestFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(kubeDir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && (strings.HasSuffix(path, ".yaml") || strings.HasSuffix(path, ".yml")) {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no manifests found")
	}
	return files
}

func readKustomization(t *testing.T, dir string) kustomization {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("%s/kustomization.yaml: %v", dir, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("%s/kustomization.yaml: apiVersion/kind %s/%s", dir, k.APIVersion, k.Kind)
	}
	return k
}

func TestEveryManifestDecodesStrictly(t *testing.T) {
	for _, f := range append(manifestFiles(t), "observability/monitors.yaml") {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		for _, d := range readFileDocs(t, f) {
			if d.apiVersion == "" || d.kind == "" || d.name == "" {
				t.Errorf("%s: apiVersion, kind and metadata.name are required", d)
				continue
			}
			v, err := decodeStrict(d)
			if err != nil {
				t.Errorf("%s: %v", d, err)
				continue
			}
			if _, spec, ok := podSpecOf(v); ok {
				for _, p := range podSpecProblems(spec) {
					t.Errorf("%s: %s", d, p)
				}
			}
		}
	}
}

func TestStrictDecodeRefusesUnknownFields(t *testing.T) {
	for name, src := range map[string]string{
		"typo in pod spec":    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  template:\n    spec:\n      containres: []\n",
		"duplicate key":       "apiVersion: v1\nkind: Service\nmetadata: {name: x, name: y}\n",
		"istio typo":          "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec:\n  mtls: {mdoe: STRICT}\n",
		"unmodelled kind":     "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: x}\n",
		"istio beta version":  "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: x}\n",
		"monitor wrong field": "apiVersion: monitoring.coreos.com/v1\nkind: PodMonitor\nmetadata: {name: x}\nspec: {endpoints2: []}\n",
	} {
		t.Run(name, func(t *testing.T) {
			docs, err := parseDocs(name, []byte(src))
			failed := err != nil
			for _, d := range docs {
				if _, err := decodeStrict(d); err != nil {
					failed = true
				}
			}
			if !failed {
				t.Errorf("accepted %q", src)
			}
		})
	}
}

func TestKustomizationsReferenceEveryFile(t *testing.T) {
	dirs := map[string]bool{}
	for _, f := range manifestFiles(t) {
		if filepath.Base(f) == "kustomization.yaml" {
			dirs[filepath.Dir(f)] = true
		}
	}
	for _, want := range []string{kubeDir, kubeDir + "/base", kubeDir + "/samples", kubeDir + "/istiod-alias", kubeDir + "/node-agent", kubeDir + "/certmanager-signer", kubeDir + "/certmanager-signer-approve"} {
		if !dirs[want] {
			t.Errorf("%s/kustomization.yaml missing", want)
		}
	}
	used := map[string]bool{}
	for dir := range dirs {
		k := readKustomization(t, dir)
		used[filepath.Join(dir, "kustomization.yaml")] = true
		for _, r := range k.Resources {
			p := filepath.Join(dir, r)
			fi, err := os.Stat(p)
			if err != nil {
				t.Errorf("%s: resource %s: %v", dir, r, err)
				continue
			}
			if fi.IsDir() && !dirs[p] {
				t.Errorf("%s: resource %s is a directory without kustomization.yaml", dir, r)
			}
			used[p] = true
		}
		for _, g := range k.ConfigMapGenerator {
			for _, f := range g.Files {
				p := filepath.Join(dir, f)
				if _, err := os.Stat(p); err != nil {
					t.Errorf("%s: configMapGenerator %s: %v", dir, g.Name, err)
				}
				used[p] = true
			}
			// Pods mount the policy ConfigMap by its plain name.
			if k.GeneratorOptions == nil || !k.GeneratorOptions.DisableNameSuffixHash {
				t.Errorf("%s: configMapGenerator %s needs generatorOptions.disableNameSuffixHash", dir, g.Name)
			}
		}
	}
	for _, f := range manifestFiles(t) {
		if !used[f] {
			t.Errorf("%s is not referenced by any kustomization.yaml", f)
		}
	}
	if k := readKustomization(t, kubeDir); !slices.Equal(k.Resources, []string{"base"}) {
		t.Errorf("deploy/kubernetes applies %v; want only base (samples are injected first)", k.Resources)
	}
}

// kustomizeBuild renders a kustomize directory with kubectl, if present.
func kustomizeBuild(t *testing.T, dir string) []byte {
	t.Helper()
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		return nil
	}
	out, err := exec.Command(kubectl, "kustomize", dir).Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok && bytes.Contains(ee.Stderr, []byte("unknown command")) {
			return nil
		}
		t.Fatalf("kubectl kustomize %s: %v\n%s", dir, err, out)
	}
	return out
}

func TestKustomizeBuildDecodesStrictly(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl not installed: kustomize output not checked (the files themselves are, by TestEveryManifestDecodesStrictly)")
	}
	for _, dir := range []string{kubeDir, kubeDir + "/samples", kubeDir + "/istiod-alias", kubeDir + "/node-agent", kubeDir + "/certmanager-signer", kubeDir + "/certmanager-signer-approve"} {
		out := kustomizeBuild(t, dir)
		if out == nil {
			t.Skip("this kubectl has no kustomize")
		}
		for _, d := range readDocs(t, dir, out) {
			if _, err := decodeStrict(d); err != nil {
				t.Errorf("%s: %v", d, err)
			}
		}
	}
}

func TestControlPlane(t *testing.T) {
	objs := map[string]any{}
	for _, f := range manifestFiles(t) {
		if !strings.HasPrefix(f, kubeDir+"/base/") || filepath.Base(f) == "kustomization.yaml" || strings.Contains(f, "/policy/") {
			continue
		}
		for _, d := range readFileDocs(t, f) {
			v, err := decodeStrict(d)
			if err != nil {
				t.Fatalf("%s: %v", d, err)
			}
			objs[d.kind+"/"+d.name] = v
		}
	}
	get := func(key string) any {
		v, ok := objs[key]
		if !ok {
			t.Fatalf("base has no %s", key)
		}
		return v
	}

	t.Run("CA deployment", func(t *testing.T) {
		d := get("Deployment/meshproxy-ca").(*appsv1.Deployment)
		if d.Namespace != "istio-system" {
			t.Errorf("namespace %q", d.Namespace)
		}
		if d.Spec.Replicas == nil || *d.Spec.Replicas != 2 {
			t.Errorf("replicas %v, want 2", d.Spec.Replicas)
		}
		spec := d.Spec.Template.Spec
		if spec.ServiceAccountName != "meshproxy-ca" {
			t.Errorf("serviceAccountName %q", spec.ServiceAccountName)
		}
		if len(spec.Containers) != 1 {
			t.Fatalf("%d containers", len(spec.Containers))
		}
		c := spec.Containers[0]
		args := strings.Join(c.Args, " ")
		for _, want := range []string{"ca serve", "--dir /etc/cacerts", "--auth kubernetes", "--listen :15012"} {
			if !strings.Contains(args, want) {
				t.Errorf("args %q lack %q", args, want)
			}
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool {
			return m.MountPath == "/etc/cacerts" && m.ReadOnly && slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool {
				return v.Name == m.Name && v.Secret != nil && v.Secret.SecretName == "cacerts"
			})
		}) {
			t.Error("the cacerts Secret is not mounted read-only at /etc/cacerts")
		}
		checkHardened(t, c, spec.SecurityContext)
		if c.ReadinessProbe == nil || c.LivenessProbe == nil {
			t.Error("CA needs readiness and liveness probes")
		}
		if d.Spec.Template.Annotations[inject.InjectAnnotation] != "false" {
			t.Error("CA pods must opt out of injection")
		}
	})

	t.Run("CA service", func(t *testing.T) {
		s := get("Service/meshproxy-ca").(*corev1.Service)
		d := get("Deployment/meshproxy-ca").(*appsv1.Deployment)
		if !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == 15012 }) {
			t.Error("meshproxy-ca does not serve 15012")
		}
		for k, v := range s.Spec.Selector {
			if d.Spec.Template.Labels[k] != v {
				t.Errorf("selector %s=%s does not match the CA pods", k, v)
			}
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.StrVal != "" && !slices.ContainsFunc(d.Spec.Template.Spec.Containers[0].Ports, func(cp corev1.ContainerPort) bool {
				return cp.Name == p.TargetPort.StrVal
			}) {
				t.Errorf("targetPort %q is not a named port of the CA", p.TargetPort.StrVal)
			}
		}
	})

	t.Run("RBAC is create tokenreviews only", func(t *testing.T) {
		r := get("ClusterRole/meshproxy-ca-tokenreview").(*rbacv1.ClusterRole)
		want := []rbacv1.PolicyRule{{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}}}
		if len(r.Rules) != 1 || !slices.Equal(r.Rules[0].APIGroups, want[0].APIGroups) ||
			!slices.Equal(r.Rules[0].Resources, want[0].Resources) || !slices.Equal(r.Rules[0].Verbs, want[0].Verbs) ||
			len(r.Rules[0].ResourceNames)+len(r.Rules[0].NonResourceURLs) != 0 || r.AggregationRule != nil {
			t.Errorf("rules %+v, want exactly %+v", r.Rules, want)
		}
		b := get("ClusterRoleBinding/meshproxy-ca-tokenreview").(*rbacv1.ClusterRoleBinding)
		if b.RoleRef.Name != r.Name || b.RoleRef.Kind != "ClusterRole" ||
			len(b.Subjects) != 1 || b.Subjects[0].Name != "meshproxy-ca" || b.Subjects[0].Namespace != "istio-system" {
			t.Errorf("binding %+v", b)
		}
		if _, ok := objs["ServiceAccount/meshproxy-ca"]; !ok {
			t.Error("no ServiceAccount meshproxy-ca")
		}
	})

	t.Run("RBAC for the config mirror is read-only on the mirrored kinds", func(t *testing.T) {
		r := get("ClusterRole/meshproxy-ca-istio-config").(*rbacv1.ClusterRole)
		granted := map[string]bool{}
		for _, rule := range r.Rules {
			if !slices.Equal(rule.Verbs, []string{"list", "watch"}) || len(rule.ResourceNames)+len(rule.NonResourceURLs) != 0 {
				t.Errorf("rule %+v: want verbs list and watch (nothing else) on whole resources", rule)
			}
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					granted[res+"."+g] = true
				}
			}
		}
		want := map[string]bool{}
		for _, res := range mirror.Resources {
			want[res.Name()] = true
		}
		if !maps.Equal(granted, want) || r.AggregationRule != nil {
			t.Errorf("granted %v, want exactly %v", slices.Sorted(maps.Keys(granted)), slices.Sorted(maps.Keys(want)))
		}
		b := get("ClusterRoleBinding/meshproxy-ca-istio-config").(*rbacv1.ClusterRoleBinding)
		if b.RoleRef.Name != r.Name || b.RoleRef.Kind != "ClusterRole" ||
			len(b.Subjects) != 1 || b.Subjects[0].Kind != "ServiceAccount" || b.Subjects[0].Name != "meshproxy-ca" || b.Subjects[0].Namespace != "istio-system" {
			t.Errorf("binding %+v", b)
		}
		d := get("Deployment/meshproxy-ca").(*appsv1.Deployment)
		if !slices.Contains(d.Spec.Template.Spec.Containers[0].Args, "--mirror-istio-config") {
			t.Error("the CA does not run the config mirror (--mirror-istio-config)")
		}
	})

	t.Run("namespace", func(t *testing.T) {
		get("Namespace/istio-system")
	})
}

// checkHardened asserts non-root, read-only root, no privilege escalation,
// all capabilities dropped.
func checkHardened(t *testing.T, c corev1.Container, pod *corev1.PodSecurityContext) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("container %s: no securityContext", c.Name)
	}
	nonRoot := (sc.RunAsNonRoot != nil && *sc.RunAsNonRoot) || (pod != nil && pod.RunAsNonRoot != nil && *pod.RunAsNonRoot)
	if !nonRoot {
		t.Errorf("container %s: runAsNonRoot not set", c.Name)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Errorf("container %s: root filesystem writable", c.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("container %s: privilege escalation allowed", c.Name)
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 {
		t.Errorf("container %s: capabilities %+v, want drop ALL, add none", c.Name, sc.Capabilities)
	}
}

func TestMeshPolicyCopiesMatch(t *testing.T) {
	base, err := os.ReadFile(kubeDir + "/base/policy/mesh-peerauthentication.yaml")
	if err != nil {
		t.Fatal(err)
	}
	sample, err := os.ReadFile(kubeDir + "/samples/policy/mesh-peerauthentication.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(base, sample) {
		t.Error("samples/policy/mesh-peerauthentication.yaml differs from base/policy/: keep the copy identical")
	}
	docs := readDocs(t, "mesh-peerauthentication.yaml", base)
	if len(docs) != 1 {
		t.Fatalf("%d documents", len(docs))
	}
	v, err := decodeStrict(docs[0])
	if err != nil {
		t.Fatal(err)
	}
	pa := v.(*peerAuthentication)
	if pa.Metadata.Namespace != "istio-system" || pa.Spec.Selector != nil || pa.Spec.MTLS == nil || pa.Spec.MTLS.Mode != "STRICT" {
		t.Errorf("mesh policy %+v: want STRICT in istio-system without selector", pa)
	}
}

// TestSamplePolicyEnforcedBySidecarPolicyEngine loads the demo's policy
// ConfigMap content with the sidecar's own policy package, laid out as the
// kubelet mounts a ConfigMap, and checks what the demo promises: echo is
// STRICT and admits only the client's identity.
func TestSamplePolicyEnforcedBySidecarPolicyEngine(t *testing.T) {
	k := readKustomization(t, kubeDir+"/samples")
	dir := t.TempDir()
	data := filepath.Join(dir, "..2026_01_01_00_00_00.000000001")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Base(data), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	var gens int
	for _, g := range k.ConfigMapGenerator {
		if g.Name != inject.PolicyConfigMap {
			continue
		}
		gens++
		for _, f := range g.Files {
			b, err := os.ReadFile(filepath.Join(kubeDir, "samples", f))
			if err != nil {
				t.Fatal(err)
			}
			name := filepath.Base(f)
			if err := os.WriteFile(filepath.Join(data, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if gens != 1 {
		t.Fatalf("samples generate %d %s ConfigMaps, want 1", gens, inject.PolicyConfigMap)
	}
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := func(sa string) spiffeid.ID { return spiffeid.RequireFromPath(td, "/ns/demo/sa/"+sa) }
	quiet := slog.New(slog.DiscardHandler)

	echo, err := policy.NewStore(dir, policy.Workload{Namespace: "demo", Labels: map[string]string{"app": "echo"}}, policy.WithTrustDomain(td), policy.WithLogger(quiet))
	if err != nil {
		t.Fatalf("sidecar policy engine rejects the sample policy: %v", err)
	}
	snap := echo.Current()
	if m := snap.InboundMode(5678); m != policy.ModeStrict {
		t.Errorf("echo inbound mode %v, want STRICT", m)
	}
	if d := snap.Authorize(policy.Request{Peer: id("client"), Port: 5678}); !d.Allowed {
		t.Errorf("client refused: %+v", d)
	}
	for _, sa := range []string{"other", "echo", "default"} {
		if d := snap.Authorize(policy.Request{Peer: id(sa), Port: 5678}); d.Allowed {
			t.Errorf("%s allowed: %+v", sa, d)
		}
	}

	client, err := policy.NewStore(dir, policy.Workload{Namespace: "demo", Labels: map[string]string{"app": "client"}}, policy.WithTrustDomain(td), policy.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	if m := client.Current().InboundMode(8080); m != policy.ModeStrict {
		t.Errorf("client inbound mode %v, want STRICT (mesh-wide)", m)
	}
}
