package cluster

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// queryEffective is BPF_F_QUERY_EFFECTIVE: the programs that act on a
// cgroup, wherever in its ancestry they are attached.
const queryEffective = 1

// podProcessCgroup finds a process of the pod with UID uid whose command
// is comm, by the kernel's own record (/proc/PID/cgroup), and returns its
// cgroup v2 directory on this host — independently of the code under test,
// which derives the pod's cgroup from the kubelet's layout.
func podProcessCgroup(uid, comm string) (string, error) {
	procs, err := filepath.Glob("/proc/[0-9]*/comm")
	if err != nil {
		return "", err
	}
	// The kubelet names pod cgroups podUID, with - or _ (systemd driver).
	marks := []string{"pod" + uid, "pod" + strings.ReplaceAll(uid, "-", "_")}
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || strings.TrimSpace(string(b)) != comm {
			continue
		}
		f, err := os.Open(filepath.Join(filepath.Dir(p), "cgroup"))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		var v2 string
		inPod := false
		for sc.Scan() {
			line := sc.Text()
			for _, m := range marks {
				inPod = inPod || strings.Contains(line, m)
			}
			if rest, ok := strings.CutPrefix(line, "0::"); ok {
				v2 = rest
			}
		}
		f.Close()
		if !inPod || v2 == "" {
			continue
		}
		for _, mount := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
			dir := filepath.Join(mount, v2)
			if _, err := os.Stat(filepath.Join(dir, "cgroup.procs")); err == nil {
				return dir, nil
			}
		}
		return "", fmt.Errorf("process %s of pod %s is in cgroup v2 %s, not found under /sys/fs/cgroup", filepath.Dir(p), uid, v2)
	}
	return "", fmt.Errorf("no %s process of pod %s on this node", comm, uid)
}

// connect4Programs counts the cgroup/connect4 programs in effect for the
// cgroup directory dir — what redirects a process's IPv4 connects there.
func connect4Programs(dir string) (int, error) {
	f, err := os.Open(dir)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupInet4Connect, QueryFlags: queryEffective})
	if err != nil {
		return 0, fmt.Errorf("query connect4 programs of %s: %w", dir, err)
	}
	return len(res.Programs), nil
}
