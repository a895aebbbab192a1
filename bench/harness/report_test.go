package harness

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"
	"time"
)

// TestReportGoalsUseTheIssueBaselines: issue 17's new-connection target is
// against HAProxy doing full handshakes (haproxy-full, which runs only the
// new-connection scenario), the resuming HAProxy is reported beside it, and
// the bulk and no-regression targets are against the meshproxy of the
// issue's day (meshproxy-baseline) when the run has it.
func TestReportGoalsUseTheIssueBaselines(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Peers = []Peer{Meshproxy, MeshproxyDirect, HAProxy, HAProxyFull, MeshproxyBaseline, AEADFloor}
	cfg.Scenarios = []Scenario{ScenarioConns, ScenarioBulk}
	cfg.Rounds = 1
	rep := &Report{Config: cfg}
	add := func(sc Scenario, p Peer, ops, bytes int64) {
		rep.Samples = append(rep.Samples, Sample{Scenario: sc, Peer: p, Result: &Result{
			Ops: ops, Bytes: bytes, Elapsed: time.Second, Latencies: []time.Duration{time.Millisecond},
		}})
	}
	// conns/s: meshproxy 3000, direct 900, HAProxy 750 (resuming), 500 (full), baseline 950.
	add(ScenarioConns, Meshproxy, 3000, 0)
	add(ScenarioConns, MeshproxyDirect, 900, 0)
	add(ScenarioConns, HAProxy, 750, 0)
	add(ScenarioConns, HAProxyFull, 500, 0)
	add(ScenarioConns, MeshproxyBaseline, 950, 0)
	// bulk MB/s: meshproxy 520, direct 450, HAProxy 400, baseline 400, the ceiling 480.
	for p, mb := range map[Peer]int64{Meshproxy: 520, MeshproxyDirect: 450, HAProxy: 400, MeshproxyBaseline: 400, AEADFloor: 480} {
		add(ScenarioBulk, p, 1, mb*1e6)
	}
	expectReport(t, rep,
		"| new connections/s (vs full handshakes) | ≥ 5.0× HAProxy-full | 6.00× | yes |",
		"| new connections/s (vs HAProxy resuming sessions: stricter than the issue) | ≥ 5.0× HAProxy | 4.00× | **no** |",
		"| new connections/s | ≥ 3.0× meshproxy-direct | 3.33× | yes |",
		"| bulk MB/s (vs the meshproxy of the issue's day) | ≥ 1.3× meshproxy-baseline | 1.30× | yes |",
		"| bulk MB/s (vs this build's per-connection mode) | ≥ 1.3× meshproxy-direct | 1.16× | **no** |",
		"| per-connection mode, no regression: new connections/s | ≥ 1.0× meshproxy-baseline | 0.95× | **no** |",
		"| per-connection mode, no regression: bulk MB/s | ≥ 1.0× meshproxy-baseline | 1.12× | yes |",
		// HAProxy-full has no bulk figure: it does not run that scenario.
		"| bulk download (1 conn) | MB/s | 520 | 450 | 400 | n/a | 400 | 480 |",
		"Bulk ceiling of this machine: aead-floor (the least work per byte an encrypting pair can do) moves 480 MB/s, 1.20× meshproxy-baseline; meshproxy reaches 1.08× of it; meshproxy-direct reaches 0.94× of it.",
	)
}

// expectReport fails the test for every line of want the report lacks.
func expectReport(t *testing.T, rep *Report, want ...string) {
	t.Helper()
	var b bytes.Buffer
	rep.WriteMarkdown(&b)
	md := b.String()
	for _, w := range want {
		if !strings.Contains(md, w) {
			t.Errorf("report lacks %q:\n%s", w, md)
		}
	}
}

// TestPeersRunTheirScenarios: haproxy-full takes part only in the
// new-connection scenario (elsewhere it would repeat HAProxy's runs);
// ghostunnel, which passes no half-close on, in every scenario but upload.
func TestPeersRunTheirScenarios(t *testing.T) {
	for _, sc := range append(AllScenarios[:len(AllScenarios):len(AllScenarios)], ScenarioMixed, ScenarioUpload) {
		if got, want := HAProxyFull.Runs(sc), sc == ScenarioConns; got != want {
			t.Errorf("haproxy-full runs %s = %v, want %v", sc, got, want)
		}
		if got, want := Ghostunnel.Runs(sc), sc != ScenarioUpload; got != want {
			t.Errorf("ghostunnel runs %s = %v, want %v", sc, got, want)
		}
		for _, p := range []Peer{Meshproxy, HAProxy, Stunnel, GoTLS, AEADFloor, MeshproxyBaseline} {
			if !p.Runs(sc) {
				t.Errorf("%s does not run %s", p, sc)
			}
		}
	}
	for _, name := range []string{"haproxy-full", "meshproxy-baseline", " HAProxy ", "ghostunnel", "go-tls", "aead-floor"} {
		if _, err := ParsePeer(name); err != nil {
			t.Errorf("ParsePeer(%q): %v", name, err)
		}
	}
	if _, err := ParsePeer("envoy"); err == nil || !strings.Contains(err.Error(), "haproxy-full") {
		t.Errorf("ParsePeer(envoy) = %v, want an error listing the peers", err)
	}
}

// TestMachineCPUCountsBusyTime: /proc/stat's busy time grows while this
// process spins, never beyond the total, and the report's share of other
// processes never goes below zero.
func TestMachineCPUCountsBusyTime(t *testing.T) {
	busy0, total0, err := MachineCPU()
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
	}
	busy1, total1, err := MachineCPU()
	if err != nil {
		t.Fatal(err)
	}
	if busy1-busy0 < 100*time.Millisecond || busy1-busy0 > total1-total0 || busy1 > total1 {
		t.Errorf("spinning 300ms: busy %s of total %s (from busy %s of %s)", busy1-busy0, total1-total0, busy0, total0)
	}
	s := &Sample{CPU: [2]time.Duration{time.Second, time.Second}, LoadCPU: time.Second, MachineBusy: 2 * time.Second, MachineTotal: 4 * time.Second}
	if v, ok := otherCPU(s); !ok || v != 0 {
		t.Errorf("otherCPU with more accounted than busy = %v, %v; want 0", v, ok)
	}
	s.MachineBusy = 4 * time.Second
	if v, _ := otherCPU(s); v != 25 {
		t.Errorf("otherCPU = %v%%, want 25%%", v)
	}
}

// TestRatiosPairRunsOfOneRound: a ratio compares the two peers' runs of the
// same round, so the machine getting faster between rounds (here 3× from
// round 1 on, after meshproxy's run of round 1) is not read as a
// difference between them; the medians of each peer still show it.
func TestRatiosPairRunsOfOneRound(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Peers = []Peer{Meshproxy, HAProxy}
	cfg.Scenarios = []Scenario{ScenarioKept}
	cfg.Rounds = 3
	rep := &Report{Config: cfg}
	for round, ops := range [][2]int64{{1100, 1000}, {1100, 3000}, {3300, 3000}} {
		for i, p := range []Peer{Meshproxy, HAProxy} {
			rep.Samples = append(rep.Samples, Sample{Scenario: ScenarioKept, Peer: p, Round: round, Result: &Result{
				Ops: ops[i], Elapsed: time.Second, Latencies: []time.Duration{time.Millisecond},
			}})
		}
	}
	// Medians 1100 and 3000 (0.37× as a ratio of medians); per round 1.10×, 0.37×, 1.10×.
	expectReport(t, rep,
		"| kept connections (8 conns, 1024 B ping-pong) | requests/s | 1100 | 3000 | 1.10× |",
		"| kept-connection requests/s | ≥ 1.3× HAProxy | 1.10× | **no** |",
	)
}

// TestMachineSaysCongestionControl: the report names the host's TCP
// congestion control, read from the kernel (BBR paces every loopback
// socket that keeps it, which moves every peer's figures).
func TestMachineSaysCongestionControl(t *testing.T) {
	var b bytes.Buffer
	Machine{Kernel: "6.1", Congestion: "bbr"}.WriteMarkdown(&b)
	if want := "- TCP congestion control (host default): bbr\n"; !strings.Contains(b.String(), want) {
		t.Errorf("machine description lacks %q:\n%s", want, b.String())
	}
	data, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Skipf("no TCP congestion control to read here: %v", err)
	}
	if got, want := DescribeMachine(context.Background(), Binaries{}).Congestion, strings.TrimSpace(string(data)); got != want {
		t.Errorf("DescribeMachine().Congestion = %q, want the kernel's %q", got, want)
	}
}
