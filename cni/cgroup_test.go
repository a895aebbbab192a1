package cni

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPodCgroupFindsKubeletLayouts: the pod's cgroup is found for both
// kubelet cgroup drivers and every QoS class, and the runtime's
// cgroupPath wins when it names a directory below the root.
func TestPodCgroupFindsKubeletLayouts(t *testing.T) {
	const uid = "7d1c2a3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
	u := strings.ReplaceAll(uid, "-", "_")
	for _, layout := range []string{
		"kubepods/pod" + uid,
		"kubepods/burstable/pod" + uid,
		"kubepods/besteffort/pod" + uid,
		"kubepods.slice/kubepods-pod" + u + ".slice",
		"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + u + ".slice",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + u + ".slice",
	} {
		root := t.TempDir()
		want := filepath.Join(root, layout)
		if err := os.MkdirAll(want, 0o755); err != nil {
			t.Fatal(err)
		}
		if got, err := podCgroup(root, "", uid); err != nil || got != want {
			t.Errorf("%s: got %q, %v", layout, got, err)
		}
	}
	root := t.TempDir()
	runtime := filepath.Join(root, "custom", "pod")
	if err := os.MkdirAll(runtime, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, given := range []string{runtime, "/custom/pod", "custom/pod"} {
		if got, err := podCgroup(root, given, uid); err != nil || got != runtime {
			t.Errorf("runtime cgroupPath %q: got %q, %v; want %q", given, got, err, runtime)
		}
	}
	// A path escaping the root, or a systemd "slice:prefix:name" triple, is
	// not taken; the UID lookup then decides.
	for _, given := range []string{"../../etc", "kubepods-burstable.slice:cri-containerd:abc"} {
		if got, err := podCgroup(root, given, uid); err == nil {
			t.Errorf("runtime cgroupPath %q: got %q, want no cgroup found", given, got)
		}
	}
	if _, err := podCgroup(root, "", "../x"); err == nil || !strings.Contains(err.Error(), "not a UID") {
		t.Errorf("bad UID: %v", err)
	}
}

// TestParseArgs: Kubernetes keys are read from CNI_ARGS, other keys are
// ignored, and names that could not be Kubernetes names are refused.
func TestParseArgs(t *testing.T) {
	ref, ok, err := parseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1")
	if err != nil || !ok || ref != (podRef{Namespace: "shop", Name: "web-1", UID: "u1"}) {
		t.Fatalf("got %+v %v %v", ref, ok, err)
	}
	if _, ok, err := parseArgs("IgnoreUnknown=1"); ok || err != nil {
		t.Fatalf("non-Kubernetes container: ok %v err %v", ok, err)
	}
	for _, bad := range []string{"K8S_POD_NAMESPACE=../x;K8S_POD_NAME=a", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=A/b"} {
		if _, _, err := parseArgs(bad); err == nil {
			t.Errorf("%q: accepted", bad)
		}
	}
}

// TestRecordPathRefusesTraversal: container IDs become file names only when
// they follow the CNI spec's rule.
func TestRecordPathRefusesTraversal(t *testing.T) {
	for _, id := range []string{"../../etc/passwd", "a/b", "", ".hidden"} {
		if _, err := recordPath("/state", id); err == nil {
			t.Errorf("container ID %q accepted", id)
		}
	}
	if p, err := recordPath("/state", "abc_1.2-3"); err != nil || p != "/state/abc_1.2-3.json" {
		t.Errorf("got %q, %v", p, err)
	}
}

// TestNameRules: the CNI spec's container ID rule and the pod UID rule, at
// their edges.
func TestNameRules(t *testing.T) {
	for id, want := range map[string]bool{
		"a": true, "abc_1.2-3": true, strings.Repeat("a", 255): true,
		"": false, "_a": false, ".a": false, "-a": false, "a/b": false, "a b": false, strings.Repeat("a", 256): false,
	} {
		if got := validContainerID(id); got != want {
			t.Errorf("validContainerID(%.20q) = %v, want %v", id, got, want)
		}
	}
	for uid, want := range map[string]bool{
		"0123abcd-EF45-6789": true, "u": false, "-": true, strings.Repeat("f", 64): true,
		"": false, strings.Repeat("f", 65): false, "../x": false, "abc_1": false,
	} {
		if got := isPodUID(uid); got != want {
			t.Errorf("isPodUID(%.20q) = %v, want %v", uid, got, want)
		}
	}
}
