// Package procs sizes the Go scheduler to the process's load: one processor
// while what the process uses fits in one CPU, more once it needs them.
//
// A sidecar's second processor is mostly idle, and the Go runtime wakes an
// idle thread for it whenever a goroutine becomes runnable: on a lightly
// loaded sidecar that is a futex wake-up and a context switch per burst for
// nothing (one processor: 0.83x the CPU per kept-connection request, 1.15x
// the requests/s, bench/RESULTS.md). A sidecar that needs more than one CPU
// (handshakes, bulk transfers) gets them back within an interval.
package procs

import (
	"context"
	"runtime"
	"syscall"
	"time"
)

// Follower changes GOMAXPROCS between 1 and Max as the process's CPU use
// crosses Up (grow) and stays below Down (shrink, after Hold intervals).
type Follower struct {
	Max      int           // processors while busy; below 2 Run does nothing
	Interval time.Duration // how often CPU use is sampled (default 200ms)
	Up       float64       // CPUs used in an interval above which to grow (default 0.85)
	Down     float64       // CPUs used below which to shrink (default 0.6)
	Hold     int           // intervals in a row below Down before shrinking (default 10)

	// CPU is the process's CPU time so far (default: getrusage), Set sets
	// GOMAXPROCS (default runtime.GOMAXPROCS). OnChange, if set, hears of
	// each change.
	CPU      func() time.Duration
	Set      func(n int)
	OnChange func(from, to int, used float64)
}

func (f *Follower) defaults() {
	if f.Interval <= 0 {
		f.Interval = 200 * time.Millisecond
	}
	if f.Up <= 0 {
		f.Up = 0.85
	}
	if f.Down <= 0 {
		f.Down = 0.6
	}
	if f.Hold <= 0 {
		f.Hold = 10
	}
	if f.CPU == nil {
		f.CPU = processCPU
	}
	if f.Set == nil {
		f.Set = func(n int) { runtime.GOMAXPROCS(n) }
	}
}

// Run sizes the scheduler until ctx ends, starting with one processor.
func (f *Follower) Run(ctx context.Context) {
	if f.Max < 2 {
		return
	}
	f.defaults()
	t := time.NewTicker(f.Interval)
	defer t.Stop()
	f.run(ctx, t.C)
}

// run is Run with its ticks given.
func (f *Follower) run(ctx context.Context, ticks <-chan time.Time) {
	cur, below := 1, 0
	f.Set(cur)
	last, lastAt := f.CPU(), time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-ticks:
			cpu := f.CPU()
			used := 0.0
			if wall := now.Sub(lastAt); wall > 0 {
				used = float64(cpu-last) / float64(wall)
			}
			last, lastAt = cpu, now
			var next int
			next, below = f.step(cur, used, below)
			if next != cur {
				f.Set(next)
				if f.OnChange != nil {
					f.OnChange(cur, next, used)
				}
				cur = next
			}
		}
	}
}

// step decides the processors for the next interval from the current ones,
// the CPUs used in the last interval and how many intervals in a row were
// below Down; it returns the processors and the new count.
func (f *Follower) step(cur int, used float64, below int) (int, int) {
	switch {
	case cur < f.Max && used > f.Up:
		return f.Max, 0
	case cur > 1 && used < f.Down:
		if below+1 >= f.Hold {
			return 1, 0
		}
		return cur, below + 1
	}
	return cur, 0
}

// processCPU is the process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
