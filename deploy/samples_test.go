package deploy

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshproxy/meshproxy/inject"
)

// samplesManifest renders deploy/kubernetes/samples: with kubectl kustomize
// when available, else by concatenating its resources (same objects, no
// namespace set and no generated ConfigMap).
func samplesManifest(t *testing.T) []byte {
	t.Helper()
	if out := kustomizeBuild(t, kubeDir+"/samples"); out != nil {
		return out
	}
	k := readKustomization(t, kubeDir+"/samples")
	var all [][]byte
	for _, r := range k.Resources {
		b, err := os.ReadFile(filepath.Join(kubeDir, "samples", r))
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b)
	}
	return bytes.Join(all, []byte("\n---\n"))
}

// TestSamplesInjectIntoValidPods injects the sample workloads as the kind
// demo does and checks the result against the API server's rules.
func TestSamplesInjectIntoValidPods(t *testing.T) {
	for _, native := range []bool{true, false} {
		inj, err := inject.New(
			inject.WithImage("meshproxy:dev"),
			inject.WithMeshCIDRs(netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/16")),
			inject.WithExcludeOutboundCIDRs(netip.MustParsePrefix("10.96.0.1/32"), netip.MustParsePrefix("10.96.0.10/32")),
			inject.WithNativeSidecar(native),
		)
		if err != nil {
			t.Fatal(err)
		}
		out, results, err := inj.Manifest(samplesManifest(t))
		if err != nil {
			t.Fatal(err)
		}
		injected := map[string]bool{}
		for _, r := range results {
			injected[r.Object] = r.Injected
		}
		seen := map[string]bool{}
		for _, d := range readDocs(t, "injected samples", out) {
			v, err := decodeStrict(d)
			if err != nil {
				t.Fatalf("%s: %v", d, err)
			}
			meta, spec, ok := podSpecOf(v)
			if !ok {
				continue
			}
			seen[d.name] = true
			for _, p := range podSpecProblems(spec) {
				t.Errorf("native=%v %s: %s", native, d, p)
			}
			all := slices.Concat(spec.InitContainers, spec.Containers)
			has := slices.ContainsFunc(all, func(c corev1.Container) bool { return c.Name == inject.SidecarName })
			want := d.name != "plain"
			if has != want {
				t.Errorf("native=%v %s: sidecar present %v, want %v", native, d, has, want)
			}
			if want && meta.Annotations[inject.StatusAnnotation] == "" {
				t.Errorf("%s: no status annotation", d)
			}
		}
		for _, name := range []string{"echo", "client", "other", "plain"} {
			if !seen[name] {
				t.Errorf("sample %s missing", name)
			}
		}
		if len(injected) == 0 {
			t.Error("no results")
		}
	}
}
