package inject

import (
	"testing"
)

// TestEBPFCgroupAutoPassesThePodUID: with --ebpf-cgroup auto the init
// container finds the pod's cgroup itself from its UID below the host
// cgroup mount, so one manifest works whatever the node's cgroup layout.
func TestEBPFCgroupAutoPassesThePodUID(t *testing.T) {
	out, _ := mustInject(t, newInjector(t, WithMode(ModeEBPF), WithEBPFCgroup(EBPFCgroupAuto)),
		[]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: a}]\n"))
	_, spec := template(t, docsOf(t, out)[0].obj)
	ini, _ := container(spec, InitContainerName)
	for flag, want := range map[string]string{
		"--cgroup":      "auto",
		"--pod-uid":     "$(POD_UID)",
		"--cgroup-root": mountDir(t, ini, cgroupVolume),
	} {
		if got, _ := argValue(ini.Args, flag); got != want {
			t.Errorf("%s %q, want %q (args %v)", flag, got, want, ini.Args)
		}
	}
	for _, bad := range []string{"Auto", "auto/..", "/sys/fs/cgroup/x"} {
		if _, err := New(WithMode(ModeEBPF), WithEBPFCgroup(bad)); err == nil {
			t.Errorf("--ebpf-cgroup %q accepted", bad)
		}
	}
}
