package redirect

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// CgroupAuto is the --cgroup value that asks FindPodCgroup for the pod's
// cgroup instead of naming it.
const CgroupAuto = "auto"

// isPodUID reports whether s is a Kubernetes pod UID (RFC 4122 text form:
// 8-4-4-4-12 hex digits). A loop, not a regexp: a package-level regexp is
// compiled at start by every command of the binary, the sidecar included.
func isPodUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := range len(s) {
		switch {
		case i == 8 || i == 13 || i == 18 || i == 23:
			if s[i] != '-' {
				return false
			}
		case !isHex(s[i]):
			return false
		}
	}
	return true
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// maxPodCgroupDepth bounds the search below the cgroup v2 root: kubelet's
// pod cgroups sit at most a few levels down (cgroupRoot, kubepods, QoS).
const maxPodCgroupDepth = 6

// CgroupV2Root returns the cgroup v2 hierarchy under root (the host's
// /sys/fs/cgroup as the init container sees it): root itself on a unified
// (v2-only) host, root/unified on a hybrid v1 host.
func CgroupV2Root(root string) (string, error) {
	for _, dir := range []string{root, filepath.Join(root, "unified")} {
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return dir, nil
		}
	}
	return "", fmt.Errorf("%w: no cgroup v2 hierarchy at %s or %s/unified (a pure cgroup v1 node cannot attach the eBPF capture)",
		ErrUnsupported, root, root)
}

// FindPodCgroup returns the cgroup v2 directory of the pod with the given UID
// below root (see CgroupV2Root), whatever the kubelet's cgroup driver and
// cgroupRoot: cgroupfs names it pod<UID> (.../kubepods/burstable/pod<UID>),
// systemd kubepods-<qos>-pod<UID with _ for ->.slice.
func FindPodCgroup(root, podUID string) (string, error) {
	if !isPodUID(podUID) {
		return "", fmt.Errorf("%w: pod UID %q is not a UID", ErrInvalidConfig, podUID)
	}
	v2, err := CgroupV2Root(root)
	if err != nil {
		return "", err
	}
	return findPodDir(v2, podUID)
}

// findPodDir searches v2 (a cgroup v2 tree, or any directory in tests) for
// the pod's directory, at most maxPodCgroupDepth levels down.
func findPodDir(v2, podUID string) (string, error) {
	cgroupfsName := "pod" + strings.ToLower(podUID)
	systemdSuffix := "-pod" + strings.ReplaceAll(strings.ToLower(podUID), "-", "_") + ".slice"
	var found []string
	err := filepath.WalkDir(v2, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if path == v2 {
				return err
			}
			return nil // a cgroup that vanished or that we may not read
		}
		if !d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(v2, path)
		depth := 0
		if rel != "." {
			depth = strings.Count(rel, string(filepath.Separator)) + 1
		}
		name := d.Name()
		if name == cgroupfsName || strings.HasSuffix(name, systemdSuffix) {
			found = append(found, path)
			return fs.SkipDir
		}
		// Another pod's cgroup holds only its containers: never descend.
		if strings.HasPrefix(name, "pod") || strings.Contains(name, "-pod") || depth >= maxPodCgroupDepth {
			return fs.SkipDir
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("search %s for pod %s: %w", v2, podUID, err)
	}
	switch len(found) {
	case 0:
		return "", fmt.Errorf("%w: no cgroup for pod %s below %s (looked for %s and *%s)", ErrInvalidConfig, podUID, v2, cgroupfsName, systemdSuffix)
	case 1:
		return found[0], nil
	}
	return "", fmt.Errorf("%w: pod %s has several cgroups below %s: %v", ErrInvalidConfig, podUID, v2, found)
}
