// Command compare runs the comparison harness (bench/harness): a meshproxy
// sidecar pair, an HAProxy pair and a stunnel pair on loopback, driven by the
// same load generator, and prints a markdown report with medians and
// meshproxy/peer ratios. Run it from the module root:
//
//	go run ./bench/cmd/compare            # about 5 minutes
//	go run ./bench/cmd/compare -quick     # about 1 minute
//
// It builds cmd/meshproxy and bench/cmd/echo into a temporary directory,
// installs HAProxy and stunnel with apt-get if they are missing (-install),
// and stops every process it started on exit, failure or Ctrl-C. Exit
// status: 0 when every run succeeded, 1 otherwise, 2 for bad flags.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshproxy/meshproxy/bench/harness"
)

// options are the command's flags.
type options struct {
	quick                    bool
	rounds                   int
	duration, warmup, settle time.Duration
	peers, scenarios         string
	connWorkers, keptConns   int
	bulkStreams, idleConns   int
	msgSize                  int
	meshproxyBin             string
	meshproxyB               string
	baseline, baselineRef    string
	install, profile, verify bool
	peerResume               bool
	keep                     bool
	out                      string
}

func main() {
	var o options
	fs := flag.NewFlagSet("compare", flag.ContinueOnError)
	fs.BoolVar(&o.quick, "quick", false, "short run (~1 minute): 2 rounds of 1.5 s, 300 idle connections")
	fs.IntVar(&o.rounds, "rounds", 0, "rounds per scenario and peer (default 3, quick 2)")
	fs.DurationVar(&o.duration, "duration", 0, "measured time of each timed run (default 5s, quick 1.5s)")
	fs.DurationVar(&o.warmup, "warmup", -1, "unmeasured load before each timed run (default 1s, quick 300ms)")
	fs.DurationVar(&o.settle, "settle", -1, "idle scenario: wait before reading RSS (default 1s, quick 500ms)")
	fs.StringVar(&o.peers, "peers", strings.Join(harness.PeerNames(harness.AllPeers), ","), "peers to compare, comma-separated (also go-tls: a plain io.Copy over crypto/tls; aead-floor: the least work per byte an encrypting pair can do, the machine's bulk ceiling; meshproxy-hbone, meshproxy-x25519, meshproxy-1cpu; -meshproxy-b and -baseline add theirs)")
	fs.StringVar(&o.scenarios, "scenarios", "conns,kept,bulk,idle", "scenarios to run, comma-separated (also mixed: kept connections measured beside a bulk download through the same pair; upload: a bulk upload, every byte confirmed by the app after the client half-closes)")
	fs.IntVar(&o.connWorkers, "conn-workers", 0, "concurrent clients of the new-connection scenario (default 16)")
	fs.IntVar(&o.keptConns, "kept-conns", 0, "connections of the kept-connection scenario (default 8)")
	fs.IntVar(&o.bulkStreams, "bulk-streams", 0, "connections of the bulk and upload scenarios (default 1)")
	fs.IntVar(&o.idleConns, "idle-conns", 0, "connections held in the idle scenario (default 1000, quick 300)")
	fs.IntVar(&o.msgSize, "msg-size", 0, "request size in bytes (default 1024)")
	fs.StringVar(&o.meshproxyBin, "meshproxy", "", "meshproxy binary to use instead of building ./cmd/meshproxy")
	fs.StringVar(&o.meshproxyB, "meshproxy-b", "", "a second meshproxy binary, compared as peer meshproxy-b (A/B test of a change)")
	fs.StringVar(&o.baseline, "baseline", "", "a meshproxy binary of an earlier commit, compared as peer meshproxy-baseline (issue 17's \"today\")")
	fs.StringVar(&o.baselineRef, "baseline-ref", "", "git commit to build as peer meshproxy-baseline, as its deploy/Dockerfile built it (make bench-compare: 72e7d29, main when issue 17 was filed)")
	fs.BoolVar(&o.install, "install", true, "apt-get install haproxy / stunnel4 if missing")
	fs.BoolVar(&o.profile, "profile", true, "CPU-profile the meshproxy server sidecar in each timed scenario's first round and print pprof -top")
	fs.BoolVar(&o.verify, "verify-bulk", false, "check every downloaded byte in the bulk scenario (costs generator CPU) and have the app check every uploaded one in upload")
	fs.BoolVar(&o.peerResume, "peer-resume", true, "let the HAProxy and stunnel clients resume TLS sessions (their default); false compares full handshakes only")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (PKI, configs, logs, profile)")
	fs.StringVar(&o.out, "out", "", "also write the report to this file")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "compare: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}
	cfg, err := o.config()
	if err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, &o, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "compare:", err)
		stop()
		os.Exit(1)
	}
}

// config turns the flags into a harness.Config.
func (o *options) config() (harness.Config, error) {
	cfg := harness.DefaultConfig()
	if o.quick {
		cfg = harness.QuickConfig()
	}
	setInt := func(dst *int, v int) {
		if v != 0 {
			*dst = v
		}
	}
	setInt(&cfg.Rounds, o.rounds)
	setInt(&cfg.ConnWorkers, o.connWorkers)
	setInt(&cfg.KeptConns, o.keptConns)
	setInt(&cfg.BulkStreams, o.bulkStreams)
	setInt(&cfg.IdleConns, o.idleConns)
	setInt(&cfg.MsgSize, o.msgSize)
	if o.duration != 0 {
		cfg.Duration = o.duration
	}
	if o.warmup >= 0 {
		cfg.Warmup = o.warmup
	}
	if o.settle >= 0 {
		cfg.Settle = o.settle
	}
	cfg.VerifyBulk = o.verify
	cfg.Peers = nil
	for _, s := range strings.Split(o.peers, ",") {
		p, err := harness.ParsePeer(s)
		if err != nil {
			return cfg, fmt.Errorf("-peers: %w", err)
		}
		cfg.Peers = append(cfg.Peers, p)
	}
	if o.meshproxyB != "" && !slices.Contains(cfg.Peers, harness.MeshproxyB) {
		cfg.Peers = append(cfg.Peers, harness.MeshproxyB)
	}
	if o.meshproxyB == "" && slices.Contains(cfg.Peers, harness.MeshproxyB) {
		return cfg, errors.New("-peers meshproxy-b needs -meshproxy-b PATH")
	}
	if o.baseline != "" && o.baselineRef != "" {
		return cfg, errors.New("-baseline and -baseline-ref: give one")
	}
	hasBaseline := o.baseline != "" || o.baselineRef != ""
	if hasBaseline && !slices.Contains(cfg.Peers, harness.MeshproxyBaseline) {
		cfg.Peers = append(cfg.Peers, harness.MeshproxyBaseline)
	}
	if !hasBaseline && slices.Contains(cfg.Peers, harness.MeshproxyBaseline) {
		return cfg, errors.New("-peers meshproxy-baseline needs -baseline PATH or -baseline-ref COMMIT")
	}
	cfg.Scenarios = nil
	for _, s := range strings.Split(o.scenarios, ",") {
		sc, err := harness.ParseScenario(s)
		if err != nil {
			return cfg, fmt.Errorf("-scenarios: %w", err)
		}
		cfg.Scenarios = append(cfg.Scenarios, sc)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, err
	}
	return cfg, nil
}

func run(ctx context.Context, o *options, cfg harness.Config) (err error) {
	if _, err := harness.RaiseFileLimit(); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "meshproxy-bench-")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Fprintf(os.Stderr, "keeping %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		return err
	}
	bins, echoBin, meshBuild, baseBuild, ghostBuild, err := prepare(ctx, o, cfg, root, dir)
	if err != nil {
		return err
	}
	for _, p := range cfg.Peers {
		if bins.Path(p) == "" {
			return fmt.Errorf("%s is not installed (try -install)", p)
		}
	}
	machine := harness.DescribeMachine(ctx, bins)
	machine.MeshproxyBuild = meshBuild
	machine.BaselineBuild = baseBuild
	machine.GhostunnelBuild = ghostBuild

	env, err := harness.NewEnv(dir, bins, "")
	if err != nil {
		return err
	}
	env.NoPeerResume = !o.peerResume
	defer env.Close()
	_, env.AppAddr, err = env.StartEcho(ctx, echoBin)
	if err != nil {
		return err
	}
	if o.profile && slices.Contains(cfg.Peers, harness.Meshproxy) {
		cfg.ProfileDir = dir
	}
	cfg.Progress = os.Stderr
	fmt.Fprintf(os.Stderr, "comparing %v over %v, %d rounds (load average %s)\n", cfg.Peers, cfg.Scenarios, cfg.Rounds, machine.LoadAvg)
	rep, runErr := harness.Run(ctx, env, cfg)
	if rep == nil {
		return runErr
	}

	var md bytes.Buffer
	fmt.Fprintf(&md, "### Run of %s (%s)\n\n", rep.Started.UTC().Format("2006-01-02 15:04 MST"), rep.Elapsed.Round(time.Second))
	fmt.Fprintf(&md, "Command: `go run ./bench/cmd/compare %s`\n\n", strings.Join(os.Args[1:], " "))
	machine.WriteMarkdown(&md)
	fmt.Fprintf(&md, "- load average at end: %s\n", harness.LoadAvg())
	fmt.Fprintf(&md, "- TLS: 1.3 only; HAProxy and stunnel pinned to %s (what two Go peers negotiate); key exchange is each side's default\n", harness.CipherSuite)
	if o.peerResume {
		fmt.Fprintf(&md, "- session resumption: all three clients resume TLS sessions (HAProxy and stunnel by default, meshproxy between sidecars)\n\n")
	} else {
		fmt.Fprintf(&md, "- session resumption: off in the HAProxy and stunnel clients (-peer-resume=false); meshproxy still resumes between sidecars\n\n")
	}
	rep.WriteMarkdown(&md)
	if ctx.Err() == nil {
		for _, sc := range cfg.Scenarios {
			path, ok := rep.Profiles[sc]
			if !ok {
				continue
			}
			top, err := pprofTop(ctx, path)
			if err != nil {
				fmt.Fprintf(os.Stderr, "warning: pprof -top %s: %v\n", path, err)
				continue
			}
			fmt.Fprintf(&md, "\nCPU profile of the meshproxy server sidecar, scenario %s, round 1 (`go tool pprof -top %s`):\n\n```\n%s```\n", sc, filepath.Base(path), top)
		}
	}
	os.Stdout.Write(md.Bytes())
	if o.out != "" {
		if err := os.WriteFile(o.out, md.Bytes(), 0o644); err != nil {
			return fmt.Errorf("-out: %w", err)
		}
	}
	errs := rep.Errors()
	for _, e := range errs {
		fmt.Fprintln(os.Stderr, "failed:", e)
	}
	if runErr != nil {
		return runErr
	}
	if len(errs) > 0 {
		return fmt.Errorf("%d runs had errors", len(errs))
	}
	return nil
}

// prepare builds the binaries (in parallel) and finds or installs the peers;
// it also says how the meshproxy, baseline and ghostunnel binaries were built.
func prepare(ctx context.Context, o *options, cfg harness.Config, root, dir string) (bins harness.Binaries, echoBin, meshBuild, baseBuild, ghostBuild string, err error) {
	bins = harness.Binaries{Meshproxy: o.meshproxyBin, MeshproxyB: o.meshproxyB, Baseline: o.baseline}
	echoBin = filepath.Join(dir, "echo")
	var wg sync.WaitGroup
	var meshErr, echoErr, baseErr error
	meshBuild = "given binary " + o.meshproxyBin
	usesMeshproxy := slices.ContainsFunc(cfg.Peers, func(p harness.Peer) bool {
		return p != harness.MeshproxyB && p != harness.MeshproxyBaseline && strings.HasPrefix(string(p), "meshproxy")
	})
	switch {
	case !usesMeshproxy:
		meshBuild = ""
	case bins.Meshproxy == "":
		bins.Meshproxy = filepath.Join(dir, "meshproxy")
		wg.Go(func() {
			var tags string
			tags, meshErr = harness.BuildMeshproxy(ctx, root, bins.Meshproxy)
			meshBuild = fmt.Sprintf("built as deploy/Dockerfile builds it: CGO_ENABLED=0 go build -trimpath -tags %s -ldflags \"-s -w\" (the same binary for every meshproxy peer)", tags)
		})
	}
	switch {
	case o.baseline != "":
		baseBuild = "given binary " + o.baseline
	case o.baselineRef != "":
		bins.Baseline = filepath.Join(dir, "meshproxy-baseline")
		wg.Go(func() {
			commit, tags, err := harness.BuildBaseline(ctx, root, o.baselineRef, dir, bins.Baseline)
			baseErr = err
			baseBuild = fmt.Sprintf("commit %.12s (-baseline-ref %s), built as that commit's deploy/Dockerfile built it (-tags %s), run with its defaults", commit, o.baselineRef, tags)
		})
	}
	wg.Go(func() {
		echoErr = harness.Build(ctx, root, "bench/cmd/echo", echoBin)
	})
	var ghostErr, pipeErr error
	if slices.Contains(cfg.Peers, harness.Ghostunnel) {
		bins.Ghostunnel = filepath.Join(dir, "ghostunnel")
		wg.Go(func() {
			var version string
			version, ghostErr = harness.BuildGhostunnel(ctx, root, bins.Ghostunnel)
			ghostBuild = fmt.Sprintf("%s (bench/ghostunnel), CGO_ENABLED=1 go build -trimpath -ldflags \"-s -w\"", version)
		})
	}
	if slices.Contains(cfg.Peers, harness.GoTLS) || slices.Contains(cfg.Peers, harness.AEADFloor) {
		bins.TLSPipe = filepath.Join(dir, "tlspipe")
		wg.Go(func() {
			pipeErr = harness.Build(ctx, root, "bench/cmd/tlspipe", bins.TLSPipe)
		})
	}
	harness.FindPeerBinaries(&bins)
	needHAProxy := slices.Contains(cfg.Peers, harness.HAProxy) || slices.Contains(cfg.Peers, harness.HAProxyFull)
	if o.install && (bins.HAProxy == "" && needHAProxy || bins.Stunnel == "" && slices.Contains(cfg.Peers, harness.Stunnel)) {
		fmt.Fprintln(os.Stderr, "installing missing peers with apt-get")
		if err := harness.InstallPeers(ctx, bins); err != nil {
			wg.Wait()
			return bins, "", "", "", "", err
		}
		harness.FindPeerBinaries(&bins)
	}
	wg.Wait()
	return bins, echoBin, meshBuild, baseBuild, ghostBuild, errors.Join(meshErr, echoErr, baseErr, ghostErr, pipeErr)
}

// pprofTop runs `go tool pprof -top` on a profile.
func pprofTop(ctx context.Context, profile string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=30", profile)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%w: %s", err, stderr.Bytes())
	}
	return trimLines(&out), nil
}

// trimLines drops pprof's trailing spaces.
func trimLines(r io.Reader) string {
	b, _ := io.ReadAll(r)
	var sb strings.Builder
	for line := range strings.Lines(string(b)) {
		sb.WriteString(strings.TrimRight(line, " \n"))
		sb.WriteByte('\n')
	}
	return sb.String()
}
