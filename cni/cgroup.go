package cni

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// isPodUID reports whether uid may be a Kubernetes pod UID: 1 to 64 hex
// digits and dashes. (Loops rather than package-level regexps in this
// package: those are compiled at start by every command of the binary.)
func isPodUID(uid string) bool {
	if len(uid) < 1 || len(uid) > 64 {
		return false
	}
	for i := range len(uid) {
		c := uid[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F' || c == '-') {
			return false
		}
	}
	return true
}

// podCgroup finds the pod's cgroup v2 directory below root: the runtime's
// cgroupPath when it names a directory there, else the kubelet's layout for
// the cgroupfs driver (kubepods/<qos>/pod<uid>) or the systemd driver
// (kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice).
func podCgroup(root, runtimePath, uid string) (string, error) {
	if runtimePath != "" {
		p := runtimePath
		if !strings.HasPrefix(filepath.Clean(p)+"/", filepath.Clean(root)+"/") {
			p = filepath.Join(root, p)
		}
		p = filepath.Clean(p)
		if strings.HasPrefix(p+"/", filepath.Clean(root)+"/") && isDir(p) {
			return p, nil
		}
	}
	if !isPodUID(uid) {
		return "", fmt.Errorf("pod UID %q: not a UID, so the pod's cgroup cannot be found", uid)
	}
	u := strings.ReplaceAll(uid, "-", "_")
	candidates := []string{
		"kubepods/pod" + uid,
		"kubepods/burstable/pod" + uid,
		"kubepods/besteffort/pod" + uid,
		"kubepods.slice/kubepods-pod" + u + ".slice",
		"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + u + ".slice",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + u + ".slice",
	}
	for _, c := range candidates {
		if p := filepath.Join(root, c); isDir(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("no cgroup of pod UID %s below %s (looked for the kubelet's cgroupfs and systemd layouts)", uid, root)
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}
