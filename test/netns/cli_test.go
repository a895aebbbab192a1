package netns_test

import (
	"errors"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/test/netns"
)

// TestRedirectUsageErrorsNameTheFlag: bad flags exit with status 2 and a
// message naming the flag, before anything touches the kernel.
func TestRedirectUsageErrorsNameTheFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"install", "--mode", "ipfw"}, "--mode"},
		{[]string{"install", "--exclude-inbound-ports", "80,0"}, "--exclude-inbound-ports"},
		{[]string{"install", "--exclude-outbound-cidrs", "10.0.0.0/33"}, "--exclude-outbound-cidrs"},
		{[]string{"install", "--mode", "ebpf"}, "--cgroup"},
		{[]string{"install", "--cgroup", "/sys/fs/cgroup"}, "--cgroup"},
		{[]string{"install", "--proxy-uid", "0"}, "--proxy-uid"},
		{[]string{"install", "--inbound-port", "15001"}, "--inbound-port"},
		{[]string{"install", "--iptables-backend", "legacy"}, "--iptables-backend"},
		{[]string{"install", "--mode", "iptables", "--iptables-backend", "xt"}, "--iptables-backend"},
		{[]string{"install", "--inbound-port", "70000"}, "--inbound-port"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, err := exec.Command(bin, append([]string{"redirect"}, tc.args...)...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 {
				t.Fatalf("exit: %v, want status 2\n%s", err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("message does not name %s:\n%s", tc.want, out)
			}
		})
	}
}

// TestRedirectEnvironmentSetsFlags: MESHPROXY_<FLAG> works like the flag.
func TestRedirectEnvironmentSetsFlags(t *testing.T) {
	cmd := exec.Command(bin, "redirect", "install")
	cmd.Env = append(cmd.Environ(), "MESHPROXY_MODE=ipfw")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), `"ipfw"`) {
		t.Fatalf("MESHPROXY_MODE=ipfw: %v\n%s", err, out)
	}
}

// TestRedirectWithoutPrivilegeNamesTheCapability runs install as an
// unprivileged user in a fresh namespace: it fails (status 1), says which
// capability is missing, and leaves nothing behind.
func TestRedirectWithoutPrivilegeNamesTheCapability(t *testing.T) {
	a, _ := netns.NewPair(t)
	user := netns.As{UID: 1000, GID: 1000}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--mode", "nftables"}, "CAP_NET_ADMIN"},
		{[]string{"--mode", "iptables"}, "CAP_NET_ADMIN"},
		{[]string{"--mode", "ebpf", "--cgroup", netns.NewCgroup(t)}, "CAP_BPF"},
	} {
		t.Run(tc.args[1], func(t *testing.T) {
			out, err := a.Command(t, user, bin, append([]string{"redirect", "install"}, tc.args...)...).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("unprivileged install: %v, want status 1\n%s", err, out)
			}
			if !strings.Contains(string(out), tc.want) {
				t.Errorf("unprivileged install does not name %s:\n%s", tc.want, out)
			}
		})
	}
	out, err := a.Exec("nft", "list", "ruleset")
	if err != nil || strings.Contains(out, "meshproxy") || strings.Contains(out, "MESHPROXY") {
		t.Errorf("something was installed (%v):\n%s", err, out)
	}
}

// TestRedirectStatusWhenNothingInstalled says so plainly.
func TestRedirectStatusWhenNothingInstalled(t *testing.T) {
	a, _ := netns.NewPair(t)
	for _, mode := range []string{"nftables", "iptables"} {
		out, err := a.Command(t, netns.As{}, bin, "redirect", "status", "--mode", mode).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "not installed") || !strings.Contains(string(out), "missing") {
			t.Errorf("status --mode %s with nothing installed: %v\n%s", mode, err, out)
		}
	}
}
