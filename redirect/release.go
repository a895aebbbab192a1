package redirect

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// ReleaseCgroup removes the eBPF programs and maps pinned for cfg's cgroup
// (see PinDir) and touches no network namespace. The CNI plugin calls it
// when a pod's network namespace is already gone, so nothing pinned for the
// pod outlives it. Releasing what is not pinned is not an error; a config
// of another mode pins nothing, so there is nothing to release.
func ReleaseCgroup(cfg Config) error {
	cfg = cfg.withDefaults()
	if cfg.Mode != ModeEBPF || cfg.CgroupPath == "" {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cfg.BPFFS, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		return nil // no bpffs, so nothing can be pinned there
	}
	if err := removePinned(PinDir(cfg)); err != nil {
		return fmt.Errorf("release eBPF capture of cgroup %s: %w", cfg.CgroupPath, err)
	}
	return nil
}
