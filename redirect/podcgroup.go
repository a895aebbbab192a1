package redirect

import (
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"
)

// CgroupAuto is the --cgroup value that asks FindPodCgroup for the pod's
// cgroup instead of naming it.
const CgroupAuto = "auto"

// podUIDPattern is a Kubernetes pod UID (RFC 4122 text form).
var podUIDPattern = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)

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
	if !podUIDPattern.MatchString(podUID) {
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
