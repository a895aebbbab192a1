package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Scenario is one kind of load.
type Scenario string

// The scenarios, in the order a run takes them.
const (
	// ScenarioConns: a new connection per request (connect, 1 KiB echo,
	// close) from many workers; measures mTLS connections per second.
	ScenarioConns Scenario = "conns"
	// ScenarioKept: 1 KiB ping-pong on kept connections; req/s and latency.
	ScenarioKept Scenario = "kept"
	// ScenarioBulk: a download through one or a few connections; MB/s.
	ScenarioBulk Scenario = "bulk"
	// ScenarioIdle: many idle connections held; resident memory.
	ScenarioIdle Scenario = "idle"
	// ScenarioMixed: ScenarioKept's ping-pong measured while one bulk
	// download runs through the same pair (opt-in): what a bulk stream
	// does to requests that share its pooled connection.
	ScenarioMixed Scenario = "mixed"
	// ScenarioUpload: an upload through one or a few connections (opt-in;
	// BulkStreams connections), each confirmed whole by the app; MB/s.
	ScenarioUpload Scenario = "upload"
)

// AllScenarios lists the scenarios of a default run.
var AllScenarios = []Scenario{ScenarioConns, ScenarioKept, ScenarioBulk, ScenarioIdle}

// ParseScenario validates a scenario name.
func ParseScenario(s string) (Scenario, error) {
	for _, sc := range append(AllScenarios[:len(AllScenarios):len(AllScenarios)], ScenarioMixed, ScenarioUpload) {
		if string(sc) == strings.ToLower(strings.TrimSpace(s)) {
			return sc, nil
		}
	}
	return "", fmt.Errorf("unknown scenario %q (want conns, kept, bulk, idle, mixed or upload)", s)
}

// Config is what a comparison run does.
type Config struct {
	Peers     []Peer
	Scenarios []Scenario
	Rounds    int           // runs of each (scenario, peer); the report takes the median
	Duration  time.Duration // measured time of each timed run
	Warmup    time.Duration // unmeasured load before each timed run
	// Settle is how long the idle scenario waits before reading RSS.
	Settle      time.Duration
	ConnWorkers int // concurrent clients of ScenarioConns
	KeptConns   int // connections of ScenarioKept
	BulkStreams int // connections of ScenarioBulk and ScenarioUpload
	IdleConns   int // connections held in ScenarioIdle
	MsgSize     int // request size of ScenarioConns and ScenarioKept
	// VerifyBulk checks every downloaded byte (costs the generator CPU)
	// and has the app check every uploaded one (costs the app's).
	VerifyBulk bool
	// ProfileDir, if set, receives CPU profiles of the meshproxy server
	// sidecar (from its admin API's /debug/pprof/profile), one per timed
	// scenario, taken during its first round:
	// meshproxy-server-<scenario>.pprof.
	ProfileDir string
	// Progress, if set, gets a line per run.
	Progress io.Writer
}

// DefaultConfig is the full comparison: about five minutes.
func DefaultConfig() Config {
	return Config{
		Peers:       AllPeers,
		Scenarios:   AllScenarios,
		Rounds:      3,
		Duration:    5 * time.Second,
		Warmup:      time.Second,
		Settle:      time.Second,
		ConnWorkers: 16,
		KeptConns:   8,
		BulkStreams: 1,
		IdleConns:   1000,
		MsgSize:     1024,
	}
}

// QuickConfig is a shorter comparison of about a minute.
func QuickConfig() Config {
	c := DefaultConfig()
	c.Rounds = 2
	c.Duration = 1500 * time.Millisecond
	c.Warmup = 300 * time.Millisecond
	c.Settle = 500 * time.Millisecond
	c.IdleConns = 300
	return c
}

// Validate checks a Config's numbers.
func (c *Config) Validate() error {
	switch {
	case len(c.Peers) == 0:
		return errors.New("no peers")
	case len(c.Scenarios) == 0:
		return errors.New("no scenarios")
	case c.Rounds < 1 || c.Rounds > 100:
		return fmt.Errorf("rounds %d: want 1..100", c.Rounds)
	case c.Duration <= 0 || c.Duration > 10*time.Minute:
		return fmt.Errorf("duration %s: want (0, 10m]", c.Duration)
	case c.Warmup < 0 || c.Warmup > time.Minute:
		return fmt.Errorf("warmup %s: want [0, 1m]", c.Warmup)
	case c.Settle < 0 || c.Settle > time.Minute:
		return fmt.Errorf("settle %s: want [0, 1m]", c.Settle)
	case c.ConnWorkers < 1 || c.ConnWorkers > 1024:
		return fmt.Errorf("conn workers %d: want 1..1024", c.ConnWorkers)
	case c.KeptConns < 1 || c.KeptConns > 1024:
		return fmt.Errorf("kept conns %d: want 1..1024", c.KeptConns)
	case c.BulkStreams < 1 || c.BulkStreams > 64:
		return fmt.Errorf("bulk streams %d: want 1..64", c.BulkStreams)
	case c.IdleConns < 1 || c.IdleConns > 5000:
		return fmt.Errorf("idle conns %d: want 1..5000", c.IdleConns)
	case c.MsgSize < 1 || c.MsgSize > 1<<20:
		return fmt.Errorf("message size %d: want 1..1048576", c.MsgSize)
	}
	return nil
}

// Sample is one run of one scenario against one peer.
type Sample struct {
	Scenario Scenario
	Peer     Peer
	Round    int
	Result   *Result // nil for ScenarioIdle
	// Beside is the bulk download that ran beside Result (ScenarioMixed).
	Beside *Result
	// CPU is the CPU time of the client and server proxy during the
	// measured window.
	CPU [2]time.Duration
	// RSSBefore and RSSAfter are the client and server proxy's VmRSS in
	// KiB before and while holding Held idle connections (ScenarioIdle).
	RSSBefore, RSSAfter [2]int64
	// LoadCPU is the CPU time of the load generator (this process) and the
	// echo app during the measured window; MachineBusy and MachineTotal are
	// the whole machine's busy and total CPU time then (all CPUs, from
	// /proc/stat), so what other processes took shows as the rest.
	LoadCPU, MachineBusy, MachineTotal time.Duration
	// PrivBefore and PrivAfter are their private memory (Proc.PrivateKiB)
	// at the same moments.
	PrivBefore, PrivAfter [2]int64
	Held                  int
	Err                   error
}

// Report is a comparison run's samples.
type Report struct {
	Config  Config
	Started time.Time
	Elapsed time.Duration
	Samples []Sample
	// Profiles are the paths of the meshproxy server CPU profiles taken,
	// by scenario.
	Profiles map[Scenario]string
}

// Run drives every (scenario, round, peer) in cfg, interleaving peers
// within a round and rotating which goes first. Each run gets a freshly
// started pair. A failed run is recorded and the comparison goes on; only
// cancellation stops it early (with the samples so far).
func Run(ctx context.Context, env *Env, cfg Config) (*Report, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rep := &Report{Config: cfg, Started: time.Now(), Profiles: map[Scenario]string{}}
	defer func() { rep.Elapsed = time.Since(rep.Started) }()
	for _, sc := range cfg.Scenarios {
		var peers []Peer
		for _, p := range cfg.Peers {
			if p.Runs(sc) {
				peers = append(peers, p)
			}
		}
		for r := range cfg.Rounds {
			n := len(peers)
			for i := range n {
				peer := peers[(i+r)%n]
				s := runOne(ctx, env, &cfg, rep, sc, peer, r)
				if ctx.Err() != nil {
					return rep, ctx.Err()
				}
				rep.Samples = append(rep.Samples, s)
				if cfg.Progress != nil {
					fmt.Fprintf(cfg.Progress, "%-5s round %d %-9s %s\n", sc, r+1, peer, s.summary())
				}
			}
		}
	}
	return rep, nil
}

func runOne(ctx context.Context, env *Env, cfg *Config, rep *Report, sc Scenario, peer Peer, round int) Sample {
	s := Sample{Scenario: sc, Peer: peer, Round: round}
	profile := cfg.ProfileDir != "" && peer == Meshproxy && sc != ScenarioIdle && round == 0
	pair, err := env.StartPair(ctx, peer, PairOptions{Admin: profile})
	if err != nil {
		s.Err = err
		return s
	}
	defer pair.Stop()

	if sc == ScenarioIdle {
		s.Err = runIdle(ctx, cfg, pair, &s)
		return s
	}
	load := func(d time.Duration) *Result {
		switch sc {
		case ScenarioConns:
			return NewConns(ctx, pair.Addr, cfg.ConnWorkers, cfg.MsgSize, d)
		case ScenarioKept:
			return KeptConns(ctx, pair.Addr, cfg.KeptConns, cfg.MsgSize, d)
		case ScenarioMixed:
			var bulk *Result
			done := make(chan struct{})
			go func() {
				defer close(done)
				bulk = Bulk(ctx, pair.Addr, 1, d, cfg.VerifyBulk)
			}()
			kept := KeptConns(ctx, pair.Addr, cfg.KeptConns, cfg.MsgSize, d)
			<-done
			s.Beside = bulk
			return kept
		case ScenarioUpload:
			return Upload(ctx, pair.Addr, cfg.BulkStreams, d, cfg.VerifyBulk)
		default:
			return Bulk(ctx, pair.Addr, cfg.BulkStreams, d, cfg.VerifyBulk)
		}
	}
	if cfg.Warmup > 0 {
		load(cfg.Warmup)
	}
	var profErr chan error
	if profile {
		profErr = make(chan error, 1)
		path := filepath.Join(cfg.ProfileDir, "meshproxy-server-"+string(sc)+".pprof")
		go func() { profErr <- fetchProfile(ctx, pair.Admin, cfg.Duration, path) }()
		rep.Profiles[sc] = path
	}
	cpu0, err := cpuTimes(pair)
	if err != nil {
		s.Err = err
		return s
	}
	load0, lerr0 := env.loadCPU()
	busy0, total0, merr0 := MachineCPU()
	s.Result = load(cfg.Duration)
	cpu1, err := cpuTimes(pair)
	if err != nil {
		s.Err = err
		return s
	}
	load1, lerr1 := env.loadCPU()
	busy1, total1, merr1 := MachineCPU()
	for i := range s.CPU {
		s.CPU[i] = cpu1[i] - cpu0[i]
	}
	if errors.Join(lerr0, lerr1, merr0, merr1) == nil {
		s.LoadCPU = load1 - load0
		s.MachineBusy, s.MachineTotal = busy1-busy0, total1-total0
	}
	if profErr != nil {
		if err := <-profErr; err != nil {
			delete(rep.Profiles, sc)
			fmt.Fprintf(os.Stderr, "warning: cpu profile of meshproxy server (%s): %v\n", sc, err)
		}
	}
	for _, pr := range pair.Procs() {
		if err := pr.ExitError(); err != nil {
			s.Err = fmt.Errorf("%w; log:\n%s", err, pr.LogTail(10))
			return s
		}
	}
	if s.Result.Ops == 0 {
		s.Err = fmt.Errorf("no request completed: %v", s.Result.FirstErr)
	}
	if s.Beside != nil && s.Beside.Bytes == 0 {
		s.Err = fmt.Errorf("the bulk download beside the requests moved nothing: %v", s.Beside.FirstErr)
	}
	return s
}

func runIdle(ctx context.Context, cfg *Config, pair *Pair, s *Sample) error {
	if err := sleep(ctx, cfg.Settle); err != nil {
		return err
	}
	before, err := rssKiB(pair)
	if err != nil {
		return err
	}
	privBefore, err := privateKiB(pair)
	if err != nil {
		return err
	}
	held, err := HoldIdle(ctx, pair.Addr, cfg.IdleConns)
	if err != nil {
		return fmt.Errorf("hold %d connections: %w", cfg.IdleConns, err)
	}
	defer held.Close()
	if err := sleep(ctx, cfg.Settle); err != nil {
		return err
	}
	after, err := rssKiB(pair)
	if err != nil {
		return err
	}
	privAfter, err := privateKiB(pair)
	if err != nil {
		return err
	}
	s.RSSBefore, s.RSSAfter, s.Held = before, after, held.Len()
	s.PrivBefore, s.PrivAfter = privBefore, privAfter
	return nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func cpuTimes(p *Pair) ([2]time.Duration, error) {
	var out [2]time.Duration
	for i, pr := range p.Procs() {
		t, err := pr.CPUTime()
		if err != nil {
			return out, err
		}
		out[i] = t
	}
	return out, nil
}

func rssKiB(p *Pair) ([2]int64, error) { return perProc(p, (*Proc).RSSKiB) }

func privateKiB(p *Pair) ([2]int64, error) { return perProc(p, (*Proc).PrivateKiB) }

// perProc reads one memory figure of the client and the server proxy.
func perProc(p *Pair, read func(*Proc) (int64, error)) ([2]int64, error) {
	var out [2]int64
	for i, pr := range p.Procs() {
		v, err := read(pr)
		if err != nil {
			return out, err
		}
		out[i] = v
	}
	return out, nil
}

// fetchProfile saves a CPU profile of d (whole seconds, at least one) from
// the pprof endpoint of a meshproxy admin API.
func fetchProfile(ctx context.Context, admin string, d time.Duration, path string) error {
	secs := max(1, int(d/time.Second))
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", admin, secs)
	ctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("get %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("get %s: %s: %s", url, resp.Status, b)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, cerr := io.Copy(f, io.LimitReader(resp.Body, 64<<20))
	return errors.Join(cerr, f.Close())
}

// summary is the one-line progress report of a sample.
func (s *Sample) summary() string {
	if s.Err != nil {
		first, _, _ := strings.Cut(s.Err.Error(), "\n")
		return "ERROR: " + first
	}
	if s.Scenario == ScenarioIdle {
		return fmt.Sprintf("idle RSS %d+%d KiB (private %d+%d), with %d conns %d+%d KiB (private %d+%d)",
			s.RSSBefore[0], s.RSSBefore[1], s.PrivBefore[0], s.PrivBefore[1], s.Held,
			s.RSSAfter[0], s.RSSAfter[1], s.PrivAfter[0], s.PrivAfter[1])
	}
	r := s.Result
	cpu := s.CPU[0] + s.CPU[1]
	machine := ""
	if s.MachineTotal > 0 {
		busy, _ := machineBusy(s)
		machine = fmt.Sprintf(", load cpu %s, machine busy %.0f%%", s.LoadCPU.Round(10*time.Millisecond), busy)
	}
	switch s.Scenario {
	case ScenarioBulk, ScenarioUpload:
		return fmt.Sprintf("%.1f MB/s, proxy cpu %s%s, errors %d", r.MBps(), cpu, machine, r.Errors)
	case ScenarioMixed:
		b := s.Beside
		return fmt.Sprintf("%.0f/s p50 %s p99 %s beside %.1f MB/s, proxy cpu %s%s, errors %d+%d", r.Rate(),
			r.Percentile(50).Round(time.Microsecond), r.Percentile(99).Round(time.Microsecond), b.MBps(), cpu, machine, r.Errors, b.Errors)
	default:
		return fmt.Sprintf("%.0f/s p50 %s p99 %s, proxy cpu %s%s, errors %d", r.Rate(),
			r.Percentile(50).Round(time.Microsecond), r.Percentile(99).Round(time.Microsecond), cpu, machine, r.Errors)
	}
}

// sortedMedian returns the median of vs (NaN-free), ok false if empty.
func sortedMedian(vs []float64) (float64, bool) {
	if len(vs) == 0 {
		return 0, false
	}
	vs = slices.Clone(vs)
	slices.Sort(vs)
	n := len(vs)
	if n%2 == 1 {
		return vs[n/2], true
	}
	return (vs[n/2-1] + vs[n/2]) / 2, true
}
