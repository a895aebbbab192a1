package redirect

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const testPodUID = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"

// mkdirs creates the given directories below root.
func mkdirs(t *testing.T, root string, dirs ...string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// TestFindPodCgroupLayouts: the pod's cgroup is found under both kubelet
// cgroup drivers and a custom cgroupRoot, next to other pods and their
// containers.
func TestFindPodCgroupLayouts(t *testing.T) {
	underscored := strings.ReplaceAll(testPodUID, "-", "_")
	cases := []struct {
		name string
		dirs []string
		want string
	}{{
		// cgroup v1 hybrid, cgroupfs driver, kubelet cgroupRoot /meshproxy-cluster
		// (test/cluster's node): the v2 tree mirrors the v1 paths.
		name: "cgroupfs with cgroupRoot",
		dirs: []string{
			"meshproxy-cluster/daemons",
			"meshproxy-cluster/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/abc",
			"meshproxy-cluster/kubepods/burstable/pod" + testPodUID + "/0123456789abcdef",
		},
		want: "meshproxy-cluster/kubepods/burstable/pod" + testPodUID,
	}, {
		name: "cgroupfs guaranteed",
		dirs: []string{"kubepods/pod" + testPodUID + "/ctr", "kubepods/burstable"},
		want: "kubepods/pod" + testPodUID,
	}, {
		// cgroup v2, systemd driver.
		name: "systemd",
		dirs: []string{
			"system.slice/containerd.service",
			"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod11111111_2222_3333_4444_555555555555.slice",
			"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + underscored + ".slice/cri-containerd-0123.scope",
		},
		want: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + underscored + ".slice",
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			mkdirs(t, root, c.dirs...)
			got, err := findPodDir(root, testPodUID)
			if err != nil {
				t.Fatal(err)
			}
			if got != filepath.Join(root, c.want) {
				t.Errorf("found %s, want %s", got, filepath.Join(root, c.want))
			}
		})
	}
}

func TestFindPodCgroupRefusals(t *testing.T) {
	root := t.TempDir()
	mkdirs(t, root, "kubepods/burstable/pod11111111-2222-3333-4444-555555555555")
	if _, err := findPodDir(root, testPodUID); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("absent pod: %v, want ErrInvalidConfig", err)
	}
	mkdirs(t, root, "a/kubepods/pod"+testPodUID, "b/kubepods/pod"+testPodUID)
	if _, err := findPodDir(root, testPodUID); err == nil || !strings.Contains(err.Error(), "several") {
		t.Errorf("two candidates: %v, want a refusal", err)
	}
	// Deeper than any kubelet layout: not searched.
	deep := t.TempDir()
	mkdirs(t, deep, "1/2/3/4/5/6/7/pod"+testPodUID)
	if _, err := findPodDir(deep, testPodUID); err == nil {
		t.Error("search went deeper than the bound")
	}
	for _, uid := range []string{"", "../../etc", "pod" + testPodUID, testPodUID + "/x",
		"0123456-78901-2345-6789-abcdef012345", "g1234567-8901-2345-6789-abcdef012345", strings.Repeat("a", 36)} {
		if _, err := FindPodCgroup("/sys/fs/cgroup", uid); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("uid %q: %v, want ErrInvalidConfig", uid, err)
		}
	}
}

// TestCgroupV2RootOnThisHost: the v2 hierarchy is found on this machine,
// at /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid v1).
func TestCgroupV2RootOnThisHost(t *testing.T) {
	got, err := CgroupV2Root("/sys/fs/cgroup")
	if err != nil {
		if errors.Is(err, ErrUnsupported) {
			t.Skipf("this host has no cgroup v2 hierarchy: %v", err)
		}
		t.Fatal(err)
	}
	if got != "/sys/fs/cgroup" && got != "/sys/fs/cgroup/unified" {
		t.Errorf("v2 root %s", got)
	}
	if _, err := os.Stat(filepath.Join(got, "cgroup.procs")); err != nil {
		t.Errorf("%s has no cgroup.procs: %v", got, err)
	}
	if _, err := CgroupV2Root(t.TempDir()); !errors.Is(err, ErrUnsupported) {
		t.Errorf("a plain directory: %v, want ErrUnsupported", err)
	}
}
