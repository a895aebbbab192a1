package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

type config struct {
	duration, rotateEvery, sampleEvery time.Duration
	bin                                string
	newConnWorkers, keptConns, bulk    int
	idleBatch                          int
}

func main() {
	var c config
	flag.DurationVar(&c.duration, "duration", 10*time.Minute, "how long to run the load")
	flag.DurationVar(&c.rotateEvery, "rotate-every", 30*time.Second, "force a certificate rotation on both sidecars this often")
	flag.DurationVar(&c.sampleEvery, "sample", 10*time.Second, "sample RSS, goroutines and descriptors this often")
	flag.StringVar(&c.bin, "bin", "", "meshproxy binary to run (default: build ./cmd/meshproxy into a temporary directory)")
	flag.IntVar(&c.newConnWorkers, "new-conn-workers", 4, "workers opening a new connection per round trip")
	flag.IntVar(&c.keptConns, "kept-conns", 16, "kept connections doing round trips")
	flag.IntVar(&c.bulk, "bulk-streams", 2, "bulk streams echoing 1 MiB chunks")
	flag.IntVar(&c.idleBatch, "idle-batch", 64, "idle connections opened, held and closed per batch")
	flag.Parse()
	if err := c.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pass, err := run(ctx, c)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
	if !pass {
		os.Exit(1)
	}
}

func (c *config) validate() error {
	switch {
	case c.duration <= 0 || c.rotateEvery <= 0 || c.sampleEvery <= 0:
		return errors.New("-duration, -rotate-every and -sample must be positive")
	case c.duration < 4*c.sampleEvery:
		return fmt.Errorf("-duration %s gives fewer than 4 samples of -sample %s: too few to judge", c.duration, c.sampleEvery)
	case c.newConnWorkers < 0 || c.keptConns < 0 || c.bulk < 0 || c.idleBatch < 0:
		return errors.New("load sizes must not be negative")
	}
	return nil
}

// run sets up the mesh, drives the load, samples and prints the verdict.
func run(ctx context.Context, c config) (bool, error) {
	dir, err := os.MkdirTemp("", "meshproxy-soak-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(dir)
	m, err := startMesh(ctx, dir, c.bin)
	if err != nil {
		return false, err
	}
	defer m.stop()
	fmt.Printf("soak: CA %s, client sidecar pid %d (entry %s), server sidecar pid %d, for %s; rotations every %s\n",
		m.caAddr, m.client.proc.pid(), m.entry, m.server.proc.pid(), c.duration, c.rotateEvery)

	runCtx, cancel := context.WithTimeout(ctx, c.duration)
	defer cancel()
	st := &stats{}
	loadDone := startLoad(runCtx, c, m.entry, st)

	sides := []*sidecar{m.client, m.server}
	var samples []sample
	rotate := time.NewTicker(c.rotateEvery)
	defer rotate.Stop()
	tick := time.NewTicker(c.sampleEvery)
	defer tick.Stop()
	start := time.Now()
	printHeader()
	for runCtx.Err() == nil {
		select {
		case <-runCtx.Done():
		case <-rotate.C:
			for _, s := range sides {
				if err := s.rotate(runCtx); err != nil && runCtx.Err() == nil {
					st.rotationFailures.Add(1)
					fmt.Printf("rotation failed on %s: %v\n", s.name, err)
				} else if err == nil {
					st.rotations.Add(1)
				}
			}
		case <-tick.C:
			s, err := takeSample(time.Since(start), sides, st)
			if err != nil {
				return false, err
			}
			samples = append(samples, s)
			s.print()
		}
		for _, s := range sides {
			select {
			case <-s.proc.exited():
				return false, fmt.Errorf("%s sidecar exited during the soak:\n%s", s.name, s.proc.logTail(20))
			default:
			}
		}
	}
	<-loadDone
	if ctx.Err() != nil {
		return false, errors.New("interrupted")
	}
	return verdict(os.Stdout, samples, st, len(sides)), nil
}
