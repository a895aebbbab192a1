package harness

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Machine describes where a comparison ran.
type Machine struct {
	CPUs   int
	CPU    string // model name from /proc/cpuinfo
	Kernel string
	// Congestion is the host's default TCP congestion control: with BBR
	// every loopback socket that does not choose another paces, a timer
	// per packet (meshproxy's sockets to its apps use Reno there).
	Congestion string
	Go         string
	HAProxy    string // first line of haproxy -v
	Stunnel    string // stunnel -version: version and OpenSSL lines
	// GhostunnelBuild says which ghostunnel ran and how it was built ("" without that peer).
	GhostunnelBuild string
	LoadAvg         string // /proc/loadavg when described
	// MeshproxyBuild says how the meshproxy binary was built (or which
	// binary was given).
	MeshproxyBuild string
	// BaselineBuild says which commit peer meshproxy-baseline is and how
	// it was built ("" without that peer).
	BaselineBuild string
}

// DescribeMachine collects the machine's description.
func DescribeMachine(ctx context.Context, b Binaries) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(data)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control"); err == nil {
		m.Congestion = strings.TrimSpace(string(data))
	}
	m.LoadAvg = LoadAvg()
	if b.HAProxy != "" {
		m.HAProxy = firstLines(ctx, 1, "", b.HAProxy, "-v")
	}
	if b.Stunnel != "" {
		m.Stunnel = firstLines(ctx, 3, "stunnel ", b.Stunnel, "-version")
	}
	return m
}

// LoadAvg is the 1, 5 and 15 minute load averages.
func LoadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// firstLines runs a program and returns n lines of its combined output,
// starting at the first line with prefix.
func firstLines(ctx context.Context, n int, prefix string, argv ...string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	var lines []string
	for line := range strings.Lines(string(out)) {
		line = strings.TrimSpace(line)
		if len(lines) == 0 && !strings.HasPrefix(line, prefix) {
			continue
		}
		if lines = append(lines, line); len(lines) == n {
			break
		}
	}
	return strings.Join(lines, "; ")
}

// WriteMarkdown writes the machine as a bullet list.
func (m Machine) WriteMarkdown(w io.Writer) {
	fmt.Fprintf(w, "- CPU: %d × %s (nproc %d)\n", m.CPUs, m.CPU, m.CPUs)
	fmt.Fprintf(w, "- kernel: %s\n", m.Kernel)
	if m.Congestion != "" {
		fmt.Fprintf(w, "- TCP congestion control (host default): %s\n", m.Congestion)
	}
	fmt.Fprintf(w, "- Go: %s\n", m.Go)
	if m.HAProxy != "" {
		fmt.Fprintf(w, "- HAProxy: %s\n", m.HAProxy)
	}
	if m.Stunnel != "" {
		fmt.Fprintf(w, "- stunnel: %s\n", m.Stunnel)
	}
	if m.GhostunnelBuild != "" {
		fmt.Fprintf(w, "- ghostunnel: %s\n", m.GhostunnelBuild)
	}
	if m.MeshproxyBuild != "" {
		fmt.Fprintf(w, "- meshproxy: %s\n", m.MeshproxyBuild)
	}
	if m.BaselineBuild != "" {
		fmt.Fprintf(w, "- meshproxy-baseline: %s\n", m.BaselineBuild)
	}
	fmt.Fprintf(w, "- load average at start: %s\n", m.LoadAvg)
}
