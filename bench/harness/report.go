package harness

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// metric is one row of the comparison table.
type metric struct {
	scenario Scenario
	name     string
	higher   bool // higher is better
	value    func(s *Sample) (float64, bool)
	digits   int
}

// context reports whether m describes the machine during a run (how busy,
// what others took) rather than the peer: its rows have no ratios.
func (m *metric) context() bool {
	return m.name == machineBusyName || m.name == otherCPUName
}

const (
	machineBusyName = "machine CPU busy (%)"
	otherCPUName    = "CPU of other processes (% of machine)"
)

// percentile is the p-th percentile latency of a run's requests in µs.
func percentile(p float64) func(s *Sample) (float64, bool) {
	return resultValue(func(r *Result) float64 { return micros(r.Percentile(p)) })
}

func resultValue(f func(r *Result) float64) func(s *Sample) (float64, bool) {
	return func(s *Sample) (float64, bool) {
		if s.Result == nil || s.Result.Ops == 0 {
			return 0, false
		}
		return f(s.Result), true
	}
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// cpuPerOp is the pair's CPU time per completed op, in µs.
func cpuPerOp(s *Sample) (float64, bool) {
	if s.Result == nil || s.Result.Ops == 0 {
		return 0, false
	}
	return micros(s.CPU[0]+s.CPU[1]) / float64(s.Result.Ops), true
}

// cpuPerGB is the pair's CPU time per GB moved (s).
func cpuPerGB(s *Sample) (float64, bool) {
	if s.Result == nil || s.Result.Bytes == 0 {
		return 0, false
	}
	return (s.CPU[0] + s.CPU[1]).Seconds() / (float64(s.Result.Bytes) / 1e9), true
}

// loadPerOp is the load generator's and echo app's CPU per operation (µs;
// per GB in seconds for bulk).
func loadPerOp(s *Sample) (float64, bool) {
	if s.Result == nil || s.Result.Ops == 0 || s.MachineTotal == 0 {
		return 0, false
	}
	if s.Scenario == ScenarioBulk || s.Scenario == ScenarioUpload {
		if s.Result.Bytes == 0 {
			return 0, false
		}
		return s.LoadCPU.Seconds() / (float64(s.Result.Bytes) / 1e9), true
	}
	return micros(s.LoadCPU) / float64(s.Result.Ops), true
}

// machineBusy is the share of the machine's CPU time in use during the
// window (%): near 100, the run was bound by the machine's CPUs.
func machineBusy(s *Sample) (float64, bool) {
	if s.MachineTotal == 0 {
		return 0, false
	}
	return 100 * s.MachineBusy.Seconds() / s.MachineTotal.Seconds(), true
}

// otherCPU is the share of the machine's CPU time (%) that neither the two
// proxies nor the load generator and echo app used: other processes of a
// shared machine, and kernel work not charged to a process.
func otherCPU(s *Sample) (float64, bool) {
	if s.MachineTotal == 0 {
		return 0, false
	}
	other := s.MachineBusy - s.CPU[0] - s.CPU[1] - s.LoadCPU
	return max(0, 100*other.Seconds()/s.MachineTotal.Seconds()), true
}

// idleValue reads the idle scenario's figures for proxy i (0 client, 1 server).
func idleRSS(i int) func(s *Sample) (float64, bool) {
	return func(s *Sample) (float64, bool) {
		if s.Held == 0 {
			return 0, false
		}
		return float64(s.RSSBefore[i]) * 1024 / 1e6, true // MB
	}
}

func perConn(i int) func(s *Sample) (float64, bool) {
	return func(s *Sample) (float64, bool) {
		if s.Held == 0 {
			return 0, false
		}
		return float64(s.RSSAfter[i]-s.RSSBefore[i]) * 1024 / 1e3 / float64(s.Held), true // KB
	}
}

func idlePrivate(i int) func(s *Sample) (float64, bool) {
	return func(s *Sample) (float64, bool) {
		if s.Held == 0 || s.PrivBefore[i] == 0 {
			return 0, false
		}
		return float64(s.PrivBefore[i]) * 1024 / 1e6, true // MB
	}
}

func privatePerConn(i int) func(s *Sample) (float64, bool) {
	return func(s *Sample) (float64, bool) {
		if s.Held == 0 || s.PrivBefore[i] == 0 {
			return 0, false
		}
		return float64(s.PrivAfter[i]-s.PrivBefore[i]) * 1024 / 1e3 / float64(s.Held), true // KB
	}
}

var metrics = []metric{
	{ScenarioConns, "new mTLS connections/s", true, resultValue((*Result).Rate), 0},
	{ScenarioConns, "p50 connect+echo (µs)", false, percentile(50), 0},
	{ScenarioConns, "p99 connect+echo (µs)", false, percentile(99), 0},
	{ScenarioConns, "proxy CPU per connection, both sides (µs)", false, cpuPerOp, 0},
	{ScenarioConns, "load generator + echo app CPU per connection (µs)", false, loadPerOp, 0},
	{ScenarioConns, machineBusyName, false, machineBusy, 0},
	{ScenarioConns, otherCPUName, false, otherCPU, 0},
	{ScenarioKept, "requests/s", true, resultValue((*Result).Rate), 0},
	{ScenarioKept, "p50 latency (µs)", false, percentile(50), 0},
	{ScenarioKept, "p99 latency (µs)", false, percentile(99), 0},
	{ScenarioKept, "proxy CPU per request, both sides (µs)", false, cpuPerOp, 1},
	{ScenarioKept, "load generator + echo app CPU per request (µs)", false, loadPerOp, 1},
	{ScenarioKept, machineBusyName, false, machineBusy, 0},
	{ScenarioKept, otherCPUName, false, otherCPU, 0},
	{ScenarioBulk, "MB/s", true, resultValue((*Result).MBps), 0},
	{ScenarioBulk, "proxy CPU per GB, both sides (s)", false, cpuPerGB, 2},
	{ScenarioBulk, "load generator + echo app CPU per GB (s)", false, loadPerOp, 2},
	{ScenarioBulk, machineBusyName, false, machineBusy, 0},
	{ScenarioBulk, otherCPUName, false, otherCPU, 0},
	{ScenarioMixed, "requests/s", true, resultValue((*Result).Rate), 0},
	{ScenarioMixed, "p50 latency (µs)", false, percentile(50), 0},
	{ScenarioMixed, "p99 latency (µs)", false, percentile(99), 0},
	{ScenarioMixed, "bulk MB/s beside them", true, func(s *Sample) (float64, bool) {
		if s.Beside == nil || s.Beside.Elapsed == 0 {
			return 0, false
		}
		return s.Beside.MBps(), true
	}, 0},
	{ScenarioMixed, machineBusyName, false, machineBusy, 0},
	{ScenarioMixed, otherCPUName, false, otherCPU, 0},
	{ScenarioUpload, "MB/s", true, resultValue((*Result).MBps), 0},
	{ScenarioUpload, "proxy CPU per GB, both sides (s)", false, cpuPerGB, 2},
	{ScenarioUpload, "load generator + echo app CPU per GB (s)", false, loadPerOp, 2},
	{ScenarioUpload, machineBusyName, false, machineBusy, 0},
	{ScenarioUpload, otherCPUName, false, otherCPU, 0},
	{ScenarioIdle, "RSS idle, client proxy (MB)", false, idleRSS(0), 1},
	{ScenarioIdle, "RSS idle, server proxy (MB)", false, idleRSS(1), 1},
	{ScenarioIdle, "RSS per held connection, client proxy (KB)", false, perConn(0), 1},
	{ScenarioIdle, "RSS per held connection, server proxy (KB)", false, perConn(1), 1},
	{ScenarioIdle, "private memory idle, client proxy (MB)", false, idlePrivate(0), 1},
	{ScenarioIdle, "private memory idle, server proxy (MB)", false, idlePrivate(1), 1},
	{ScenarioIdle, "private memory per held connection, client proxy (KB)", false, privatePerConn(0), 1},
	{ScenarioIdle, "private memory per held connection, server proxy (KB)", false, privatePerConn(1), 1},
}

// median is the median over rounds of m for peer, ok false if no run of it
// succeeded.
func (r *Report) median(m *metric, peer Peer) (float64, bool) {
	var vs []float64
	for i := range r.Samples {
		s := &r.Samples[i]
		if s.Scenario != m.scenario || s.Peer != peer || s.Err != nil {
			continue
		}
		if v, ok := m.value(s); ok {
			vs = append(vs, v)
		}
	}
	return sortedMedian(vs)
}

func (r *Report) has(sc Scenario) bool {
	for _, s := range r.Config.Scenarios {
		if s == sc {
			return true
		}
	}
	return false
}

func (r *Report) hasPeer(p Peer) bool {
	for _, q := range r.Config.Peers {
		if q == p {
			return true
		}
	}
	return false
}

func (r *Report) scenarioTitle(sc Scenario) string {
	c := &r.Config
	switch sc {
	case ScenarioConns:
		return fmt.Sprintf("new connection per request (%d workers, %d B echo)", c.ConnWorkers, c.MsgSize)
	case ScenarioKept:
		return fmt.Sprintf("kept connections (%d conns, %d B ping-pong)", c.KeptConns, c.MsgSize)
	case ScenarioBulk:
		return fmt.Sprintf("bulk download (%d conn)", c.BulkStreams)
	case ScenarioUpload:
		return fmt.Sprintf("bulk upload (%d conn)", c.BulkStreams)
	case ScenarioMixed:
		return fmt.Sprintf("kept connections beside a bulk download (%d conns, %d B ping-pong; 1 download)", c.KeptConns, c.MsgSize)
	default:
		return fmt.Sprintf("idle connections (%d held)", c.IdleConns)
	}
}

func format(v float64, ok bool, digits int) string {
	if !ok {
		return "—"
	}
	return fmt.Sprintf("%.*f", digits, v)
}

// ratio is the median over rounds of a's value of m divided by b's in the
// same round, and its cell. A round runs every peer once, back to back, so
// pairing within it cancels a change of the machine's speed between rounds
// (other tenants of the host), which a ratio of the two medians would
// count as a difference between the peers.
func (r *Report) ratio(m *metric, a, b Peer) (float64, string) {
	of := map[int]float64{}
	for i := range r.Samples {
		s := &r.Samples[i]
		if s.Scenario != m.scenario || s.Peer != b || s.Err != nil {
			continue
		}
		if v, ok := m.value(s); ok && v != 0 {
			of[s.Round] = v
		}
	}
	var rs []float64
	for i := range r.Samples {
		s := &r.Samples[i]
		if s.Scenario != m.scenario || s.Peer != a || s.Err != nil {
			continue
		}
		bv, ok := of[s.Round]
		if !ok {
			continue
		}
		if v, ok := m.value(s); ok {
			rs = append(rs, v/bv)
		}
	}
	x, ok := sortedMedian(rs)
	if !ok {
		return 0, "—"
	}
	return x, fmt.Sprintf("%.2f×", x)
}

// WriteMarkdown writes the comparison table, the goals of issue 17 that the
// harness measures, and every run's figures.
func (r *Report) WriteMarkdown(w io.Writer) {
	c := &r.Config
	others := []Peer{}
	for _, p := range c.Peers {
		if p != Meshproxy {
			others = append(others, p)
		}
	}
	fmt.Fprintf(w, "Medians of %d interleaved rounds; each timed run %s after %s warm-up; every run on a freshly started pair. ", c.Rounds, c.Duration, c.Warmup)
	fmt.Fprintf(w, "Ratios are meshproxy ÷ peer within each round, median over the rounds (for µs, s, MB and KB rows lower is better).\n\n")
	fmt.Fprint(w, "| scenario | metric |")
	for _, p := range c.Peers {
		fmt.Fprintf(w, " %s |", p.Title())
	}
	if r.hasPeer(Meshproxy) {
		for _, p := range others {
			fmt.Fprintf(w, " meshproxy/%s |", p.Title())
		}
	}
	fmt.Fprint(w, "\n| --- | --- |")
	for range c.Peers {
		fmt.Fprint(w, " ---: |")
	}
	if r.hasPeer(Meshproxy) {
		for range others {
			fmt.Fprint(w, " ---: |")
		}
	}
	fmt.Fprintln(w)
	for i := range metrics {
		m := &metrics[i]
		if !r.has(m.scenario) {
			continue
		}
		fmt.Fprintf(w, "| %s | %s |", r.scenarioTitle(m.scenario), m.name)
		for _, p := range c.Peers {
			if !p.Runs(m.scenario) {
				fmt.Fprint(w, " n/a |")
				continue
			}
			v, ok := r.median(m, p)
			fmt.Fprintf(w, " %s |", format(v, ok, m.digits))
		}
		if r.hasPeer(Meshproxy) {
			for _, p := range others {
				if m.context() {
					// The machine's state during the runs, not a figure of
					// meshproxy's to compare.
					fmt.Fprint(w, "  |")
					continue
				}
				if !p.Runs(m.scenario) {
					fmt.Fprint(w, " n/a |")
					continue
				}
				_, s := r.ratio(m, Meshproxy, p)
				fmt.Fprintf(w, " %s |", s)
			}
		}
		fmt.Fprintln(w)
	}
	if r.hasPeer(Meshproxy) && r.hasPeer(HAProxy) {
		fmt.Fprintln(w)
		r.writeGoals(w)
	}
	fmt.Fprintln(w)
	r.writeRuns(w)
}

func (r *Report) metric(sc Scenario, name string) *metric {
	for i := range metrics {
		if metrics[i].scenario == sc && metrics[i].name == name {
			return &metrics[i]
		}
	}
	panic("harness: no metric " + name)
}

// writeGoals checks issue 17's targets in this run: meshproxy (its
// default, HBONE negotiated between the two sidecars) against HAProxy
// (for new connections, HAProxy doing full handshakes, as the issue
// defines it; resuming HAProxy beside it), against meshproxy's own
// per-connection mode (meshproxy-direct), against ghostunnel (the issue's
// "other Go proxy") and, when the run has it, against the meshproxy of the
// issue's "today" (meshproxy-baseline).
func (r *Report) writeGoals(w io.Writer) {
	fmt.Fprintln(w, "| goal (issue 17, same run) | target | measured | met |")
	fmt.Fprintln(w, "| --- | --- | --- | --- |")
	row := func(goal, target, measured string, met, ok bool) {
		verdict := "—"
		if ok {
			verdict = map[bool]string{true: "yes", false: "**no**"}[met]
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", goal, target, measured, verdict)
	}
	ratioOf := func(sc Scenario, name, goal string, p, peer Peer, want float64) {
		if !r.has(sc) || !r.hasPeer(p) || !r.hasPeer(peer) {
			return
		}
		x, s := r.ratio(r.metric(sc, name), p, peer)
		row(goal, fmt.Sprintf("≥ %.1f× %s", want, peer.Title()), s, x >= want, s != "—")
	}
	ratioGoal := func(sc Scenario, name, goal string, peer Peer, want float64) {
		ratioOf(sc, name, goal, Meshproxy, peer, want)
	}
	lower := func(sc Scenario, name, goal string) {
		if !r.has(sc) {
			return
		}
		m := r.metric(sc, name)
		mv, mok := r.median(m, Meshproxy)
		hv, hok := r.median(m, HAProxy)
		row(goal, "lower than HAProxy", fmt.Sprintf("%s vs %s", format(mv, mok, 0), format(hv, hok, 0)), mv < hv, mok && hok)
	}
	limit := func(sc Scenario, name, goal string, peer Peer, max float64, unit string) {
		if !r.has(sc) || !r.hasPeer(peer) {
			return
		}
		v, ok := r.median(r.metric(sc, name), peer)
		row(goal, fmt.Sprintf("≤ %g %s", max, unit), format(v, ok, 1)+" "+unit, v <= max, ok)
	}
	ratioGoal(ScenarioConns, "new mTLS connections/s", "new connections/s (vs full handshakes)", HAProxyFull, 5.0)
	ratioGoal(ScenarioConns, "new mTLS connections/s", "new connections/s (vs HAProxy resuming sessions: stricter than the issue)", HAProxy, 5.0)
	ratioGoal(ScenarioConns, "new mTLS connections/s", "new connections/s", MeshproxyDirect, 3.0)
	ratioGoal(ScenarioKept, "requests/s", "kept-connection requests/s", HAProxy, 1.3)
	lower(ScenarioKept, "p50 latency (µs)", "kept-connection p50 (µs)")
	lower(ScenarioKept, "p99 latency (µs)", "kept-connection p99 (µs)")
	ratioGoal(ScenarioBulk, "MB/s", "bulk MB/s (vs the meshproxy of the issue's day)", MeshproxyBaseline, 1.3)
	ratioGoal(ScenarioBulk, "MB/s", "bulk MB/s (vs this build's per-connection mode)", MeshproxyDirect, 1.3)
	ratioGoal(ScenarioBulk, "MB/s", "bulk MB/s ahead of the other Go proxy (ghostunnel)", Ghostunnel, 1.0)
	ratioOf(ScenarioConns, "new mTLS connections/s", "per-connection mode, no regression: new connections/s", MeshproxyDirect, MeshproxyBaseline, 1.0)
	ratioOf(ScenarioKept, "requests/s", "per-connection mode, no regression: kept requests/s", MeshproxyDirect, MeshproxyBaseline, 1.0)
	ratioOf(ScenarioBulk, "MB/s", "per-connection mode, no regression: bulk MB/s", MeshproxyDirect, MeshproxyBaseline, 1.0)
	for _, p := range []Peer{Meshproxy, MeshproxyDirect} {
		limit(ScenarioIdle, "private memory idle, client proxy (MB)", p.Title()+" client sidecar private memory idle", p, 4, "MB")
		limit(ScenarioIdle, "private memory idle, server proxy (MB)", p.Title()+" server sidecar private memory idle", p, 4, "MB")
		limit(ScenarioIdle, "RSS idle, client proxy (MB)", p.Title()+" client sidecar RSS idle", p, 15, "MB")
		limit(ScenarioIdle, "RSS idle, server proxy (MB)", p.Title()+" server sidecar RSS idle", p, 15, "MB")
		limit(ScenarioIdle, "RSS per held connection, client proxy (KB)", p.Title()+" client sidecar RSS per held connection", p, 30, "KB")
		limit(ScenarioIdle, "RSS per held connection, server proxy (KB)", p.Title()+" server sidecar RSS per held connection", p, 30, "KB")
	}
	r.writeCeiling(w)
}

// writeCeiling says, when the run has aead-floor, how far this machine
// lets an encrypting userspace pair go on bulk: aead-floor against the
// issue's day, and how much of that ceiling meshproxy reaches. A bulk
// target above the ceiling's ratio is out of any such proxy's reach here.
func (r *Report) writeCeiling(w io.Writer) {
	if !r.has(ScenarioBulk) || !r.hasPeer(AEADFloor) {
		return
	}
	m := r.metric(ScenarioBulk, "MB/s")
	fv, fok := r.median(m, AEADFloor)
	if !fok {
		return
	}
	fmt.Fprintf(w, "\nBulk ceiling of this machine: %s (the least work per byte an encrypting pair can do) moves %s MB/s", AEADFloor.Title(), format(fv, true, 0))
	if r.hasPeer(MeshproxyBaseline) {
		if _, s := r.ratio(m, AEADFloor, MeshproxyBaseline); s != "—" {
			fmt.Fprintf(w, ", %s %s", s, MeshproxyBaseline.Title())
		}
	}
	for _, p := range []Peer{Meshproxy, MeshproxyDirect} {
		if r.hasPeer(p) {
			if _, s := r.ratio(m, p, AEADFloor); s != "—" {
				fmt.Fprintf(w, "; %s reaches %s of it", p.Title(), s)
			}
		}
	}
	fmt.Fprintln(w, ".")
}

// writeRuns lists every run, so a median can be traced to its rounds.
func (r *Report) writeRuns(w io.Writer) {
	fmt.Fprintln(w, "<details><summary>every run</summary>")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| scenario | round | peer | result |")
	fmt.Fprintln(w, "| --- | ---: | --- | --- |")
	for i := range r.Samples {
		s := &r.Samples[i]
		fmt.Fprintf(w, "| %s | %d | %s | %s |\n", s.Scenario, s.Round+1, s.Peer.Title(), strings.ReplaceAll(s.summary(), "|", "/"))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "</details>")
}

// Errors lists the failed runs.
func (r *Report) Errors() []error {
	var out []error
	for i := range r.Samples {
		s := &r.Samples[i]
		if s.Err != nil {
			out = append(out, fmt.Errorf("%s round %d %s: %w", s.Scenario, s.Round+1, s.Peer, s.Err))
		} else if s.Result != nil && s.Result.Errors > 0 {
			out = append(out, fmt.Errorf("%s round %d %s: %d failed requests, first: %v", s.Scenario, s.Round+1, s.Peer, s.Result.Errors, s.Result.FirstErr))
		}
	}
	return out
}
