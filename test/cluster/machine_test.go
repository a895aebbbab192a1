package cluster

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// machineState is what the cluster changes on the host and down.sh must put
// back: only things the cluster owns, since other test packages change the
// host's links and tables at the same time.
type machineState struct {
	ipForward string
	sysctls   string   // every sysctl the node changes, NAME=VALUE
	bridge    bool     // the pod bridge exists
	nftTables []string // the cluster's nftables tables that exist
	allTables string   // every nftables table in the host's namespace
	kubeRules []string // iptables chains and rules naming a KUBE- chain (the kubelet's)
	mounts    []string // mounts under the cluster's directories and its netns
	cgroups   []string // the cluster's cgroup directories
	dirs      []string // the cluster's state directories that exist
	listening []int    // the cluster's fixed ports with a listener
	processes []int    // processes in the cluster's cgroups
}

func snapshotMachine() machineState {
	var s machineState
	s.ipForward = readTrim("/proc/sys/net/ipv4/ip_forward")
	var sysctls []string
	for name := range strings.FieldsSeq(clusterEnv["CLUSTER_SYSCTLS"]) {
		sysctls = append(sysctls, name+"="+readTrim("/proc/sys/"+name))
	}
	s.sysctls = strings.Join(sysctls, " ")
	s.bridge = exec.Command("ip", "link", "show", clusterEnv["CLUSTER_BRIDGE"]).Run() == nil
	for _, t := range [][]string{{"inet", clusterEnv["CLUSTER_GUARD_TABLE"]}, {"ip", "kube-proxy"}, {"ip6", "kube-proxy"}} {
		if exec.Command("nft", "list", "table", t[0], t[1]).Run() == nil {
			s.nftTables = append(s.nftTables, strings.Join(t, " "))
		}
	}
	if out, err := exec.Command("nft", "list", "tables").Output(); err == nil {
		s.allTables = strings.TrimSpace(string(out))
	}
	for _, ipt := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"mangle", "nat", "filter"} {
			out, _ := exec.Command(ipt, "-t", table, "-S").Output()
			for line := range strings.Lines(string(out)) {
				if strings.Contains(line, "KUBE-") {
					s.kubeRules = append(s.kubeRules, ipt+" "+table+": "+strings.TrimSpace(line))
				}
			}
		}
	}
	state, run := clusterEnv["CLUSTER_STATE"], clusterEnv["CLUSTER_RUN"]
	if f, err := os.Open("/proc/self/mountinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 5 {
				continue
			}
			mp := fields[4]
			if under(mp, state) || under(mp, run) || strings.HasPrefix(mp, "/run/netns/cni-") {
				s.mounts = append(s.mounts, mp)
			}
		}
		f.Close()
	}
	cgroupDirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + clusterEnv["CLUSTER_CGROUP"])
	if _, err := os.Stat("/sys/fs/cgroup/" + clusterEnv["CLUSTER_CGROUP"]); err == nil {
		cgroupDirs = append(cgroupDirs, "/sys/fs/cgroup/"+clusterEnv["CLUSTER_CGROUP"])
	}
	s.cgroups = cgroupDirs
	for _, cg := range cgroupDirs {
		filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.Name() == "cgroup.procs" {
				data, _ := os.ReadFile(p)
				for f := range strings.FieldsSeq(string(data)) {
					if pid, err := strconv.Atoi(f); err == nil && !slices.Contains(s.processes, pid) {
						s.processes = append(s.processes, pid)
					}
				}
			}
			return nil
		})
	}
	for _, d := range []string{state, run} {
		if _, err := os.Stat(d); err == nil {
			s.dirs = append(s.dirs, d)
		}
	}
	for _, p := range []int{2379, 2380, 6443, 10248, 10249, 10250, 10256, 10257, 10259} {
		out, _ := exec.Command("ss", "-Hltn", fmt.Sprintf("sport = :%d", p)).Output()
		if strings.TrimSpace(string(out)) != "" {
			s.listening = append(s.listening, p)
		}
	}
	return s
}

func under(path, dir string) bool {
	return dir != "" && (path == dir || strings.HasPrefix(path, dir+"/"))
}

func readTrim(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "absent"
	}
	return strings.TrimSpace(string(data))
}

// recordedPIDs returns the PIDs up.sh recorded.
func recordedPIDs() map[string]int {
	pids := map[string]int{}
	entries, _ := os.ReadDir(filepath.Join(clusterEnv["CLUSTER_STATE"], "pids"))
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(clusterEnv["CLUSTER_STATE"], "pids", e.Name()))
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
			pids[e.Name()] = pid
		}
	}
	return pids
}

// testDownRestoresMachine (item 8): down.sh removes every process, the
// bridge, the nftables tables, the kubelet's iptables chains (and the
// jumps into them), mounts, cgroups and state, and restores the
// sysctls; a second run is a no-op that succeeds.
// running reports whether pid is a live process. A killed process that
// its parent has not reaped yet (a zombie: the cluster's daemons are
// reparented to PID 1, which reaps when it gets to it) has exited: it runs
// no code and holds nothing but its process table entry.
func running(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false // gone between the two looks
	}
	for line := range strings.Lines(string(status)) {
		if state, ok := strings.CutPrefix(line, "State:"); ok {
			return !strings.HasPrefix(strings.TrimSpace(state), "Z")
		}
	}
	return true
}

func testDownRestoresMachine(t *testing.T) {
	needCluster(t)
	during := snapshotMachine()
	// The checks below must be able to fail: the running cluster shows up in
	// every one of them.
	if !during.bridge || len(during.nftTables) < 2 || len(during.kubeRules) == 0 || len(during.mounts) == 0 || len(during.cgroups) == 0 ||
		len(during.dirs) != 2 || len(during.processes) == 0 || len(during.listening) == 0 || during.ipForward != "1" {
		t.Fatalf("the running cluster is not visible to the checks (they would pass vacuously): %+v", during)
	}
	pids := recordedPIDs()
	if len(pids) < 7 {
		t.Fatalf("up.sh recorded %d processes, want 7: %v", len(pids), pids)
	}
	out, err := runScript(5*time.Minute, "down.sh")
	if err != nil {
		t.Fatalf("down.sh: %v\n%s", err, out)
	}
	t.Logf("down.sh:\n%s", out)
	after := snapshotMachine()
	for name, pid := range pids {
		if running(pid) {
			if cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid)); strings.Contains(string(cg), clusterEnv["CLUSTER_CGROUP"]) {
				t.Errorf("%s (pid %d) still runs", name, pid)
			}
		}
	}
	checks := []struct {
		what        string
		before, got any
	}{
		{"ip_forward", before.ipForward, after.ipForward},
		{"sysctls", before.sysctls, after.sysctls},
		{"pod bridge " + clusterEnv["CLUSTER_BRIDGE"], before.bridge, after.bridge},
		{"the cluster's nftables tables", before.nftTables, after.nftTables},
		{"nftables tables (iptables-nft included)", before.allTables, after.allTables},
		{"the kubelet's iptables chains and the jumps into them", before.kubeRules, after.kubeRules},
		{"mounts", before.mounts, after.mounts},
		{"cgroups", before.cgroups, after.cgroups},
		{"state directories", before.dirs, after.dirs},
		{"listeners on the cluster's ports", before.listening, after.listening},
		{"processes in the cluster's cgroups", before.processes, after.processes},
	}
	for _, c := range checks {
		if fmt.Sprint(c.before) != fmt.Sprint(c.got) {
			t.Errorf("%s: before the cluster %v, after down.sh %v", c.what, c.before, c.got)
		}
	}
	out, err = runScript(time.Minute, "down.sh")
	if err != nil {
		t.Fatalf("second down.sh: %v\n%s", err, out)
	}
	if strings.TrimSpace(string(out)) != "cluster-down: down" {
		t.Errorf("second down.sh found something to do:\n%s", out)
	}
}
