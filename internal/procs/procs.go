// Package procs sizes the Go scheduler to the process's load: one processor
// while what the process does fits in one CPU and moves no bulk data, more
// once it needs them.
//
// A sidecar's second processor is mostly idle, and the Go runtime wakes an
// idle thread for it whenever a goroutine becomes runnable: on a lightly
// loaded sidecar that is a futex wake-up and a context switch per burst for
// nothing (one processor: 1.1-1.2x the kept-connection requests/s at 0.9x
// the CPU, bench/RESULTS.md). A sidecar that needs more than one CPU
// (handshakes) gets them back within an interval, and so does one that
// moves bulk data: a goroutine copying a download runs on without waiting,
// and with one processor the other connections' goroutines wait for the
// runtime to preempt it (10 ms at a time).
package procs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"runtime"
	"syscall"
	"time"
)

// Follower changes GOMAXPROCS between 1 and Max: it grows when an interval
// uses more than Up CPUs or reads bulk data (at least BulkRate bytes a
// second, BulkRead bytes or more per read on average), and shrinks after
// Hold intervals in a row below Down CPUs without bulk data.
type Follower struct {
	Max      int           // processors while busy; below 2 Run does nothing
	Interval time.Duration // how often the load is sampled (default 200ms)
	Up       float64       // CPUs used in an interval above which to grow (default 0.85)
	Down     float64       // CPUs used below which to shrink (default 0.6)
	Hold     int           // intervals in a row below Down before shrinking (default 10)
	BulkRate float64       // bytes read a second from which reads may be bulk (default 32 MB/s)
	BulkRead float64       // average bytes per read from which reads are bulk (default 16 KiB)

	// CPU is the process's CPU time so far (default: getrusage); IO the
	// bytes it read and its read system calls so far, ok false when
	// unknown (default: rchar and syscr of /proc/self/io, read through one
	// file kept open while Run runs); Set sets GOMAXPROCS (default
	// runtime.GOMAXPROCS). OnChange, if set, hears of each change. The
	// defaults allocate nothing per sample: an idle process's own sampling
	// must not look like work to the idle memory release (package
	// memtrim), which waits for an interval with next to no allocation.
	CPU      func() time.Duration
	IO       func() (read, calls uint64, ok bool)
	Set      func(n int)
	OnChange func(from, to int, s Sample)
}

// Sample is the load of one interval.
type Sample struct {
	CPUs float64 // CPU time used per wall time
	Bulk bool    // reads at BulkRate or more, of BulkRead bytes or more on average
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
	if f.BulkRate <= 0 {
		f.BulkRate = 32e6
	}
	if f.BulkRead <= 0 {
		f.BulkRead = 16 << 10
	}
	if f.CPU == nil {
		f.CPU = processCPU
	}
	if f.Set == nil {
		f.Set = func(n int) { runtime.GOMAXPROCS(n) }
	}
}

// Run sizes the scheduler until ctx ends, starting with one processor.
// Where the read counters are unknown (a kernel without task I/O
// accounting) it cannot tell a download from idle time: it sets Max and
// returns, false.
func (f *Follower) Run(ctx context.Context) bool {
	if f.Max < 2 {
		return false
	}
	f.defaults()
	if f.IO == nil {
		c, err := openIOCounters()
		if err != nil {
			f.Set(f.Max)
			return false
		}
		f.IO = c.read
		defer func() {
			c.close()
			f.IO = nil // a later Run opens the file again
		}()
	}
	if _, _, ok := f.IO(); !ok {
		f.Set(f.Max)
		return false
	}
	t := time.NewTicker(f.Interval)
	defer t.Stop()
	f.run(ctx, t.C)
	return true
}

// reading is the process's counters at one moment.
type reading struct {
	at          time.Time
	cpu         time.Duration
	read, calls uint64
	ioOK        bool
}

func (f *Follower) read(now time.Time) reading {
	r := reading{at: now, cpu: f.CPU()}
	r.read, r.calls, r.ioOK = f.IO()
	return r
}

// sample is the load between two readings.
func (f *Follower) sample(last, cur reading) Sample {
	var s Sample
	wall := cur.at.Sub(last.at)
	if wall <= 0 {
		return s
	}
	s.CPUs = float64(cur.cpu-last.cpu) / float64(wall)
	if last.ioOK && cur.ioOK && cur.read >= last.read && cur.calls > last.calls {
		bytes, calls := float64(cur.read-last.read), float64(cur.calls-last.calls)
		s.Bulk = bytes/wall.Seconds() >= f.BulkRate && bytes/calls >= f.BulkRead
	}
	return s
}

// run is Run with its ticks given.
func (f *Follower) run(ctx context.Context, ticks <-chan time.Time) {
	cur, quiet := 1, 0
	f.Set(cur)
	last := f.read(time.Now())
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-ticks:
			r := f.read(now)
			s := f.sample(last, r)
			last = r
			var next int
			next, quiet = f.step(cur, s, quiet)
			if next != cur {
				f.Set(next)
				if f.OnChange != nil {
					f.OnChange(cur, next, s)
				}
				cur = next
			}
		}
	}
}

// step decides the processors for the next interval from the current ones,
// the last interval's load and how many intervals in a row were quiet
// (below Down, no bulk data); it returns the processors and the new count.
func (f *Follower) step(cur int, s Sample, quiet int) (int, int) {
	switch {
	case cur < f.Max && (s.CPUs > f.Up || s.Bulk):
		return f.Max, 0
	case cur > 1 && s.CPUs < f.Down && !s.Bulk:
		if quiet+1 >= f.Hold {
			return 1, 0
		}
		return cur, quiet + 1
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

// ioCounters reads rchar and syscr of /proc/self/io: the bytes the
// process's read system calls returned (sockets included) and how many it
// made. It keeps the file open and reads it again from the start into its
// own buffer, allocating nothing.
type ioCounters struct {
	f   *os.File
	buf [512]byte // the file is ~100 bytes: seven "name: number" lines
}

func openIOCounters() (*ioCounters, error) {
	f, err := os.Open("/proc/self/io")
	if err != nil {
		return nil, err
	}
	return &ioCounters{f: f}, nil
}

func (c *ioCounters) read() (read, calls uint64, ok bool) {
	n, err := c.f.ReadAt(c.buf[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, 0, false
	}
	return parseIO(c.buf[:n])
}

func (c *ioCounters) close() { c.f.Close() }

// parseIO reads rchar and syscr out of /proc/PID/io's text.
func parseIO(b []byte) (read, calls uint64, ok bool) {
	var haveRead, haveCalls bool
	for line := range bytes.Lines(b) {
		name, value, found := bytes.Cut(bytes.TrimSpace(line), []byte(": "))
		if !found {
			continue
		}
		n, valid := parseUint(value)
		if !valid {
			continue
		}
		switch string(name) {
		case "rchar":
			read, haveRead = n, true
		case "syscr":
			calls, haveCalls = n, true
		}
	}
	return read, calls, haveRead && haveCalls
}

// parseUint parses a decimal counter; unlike strconv.ParseUint it takes
// bytes without a copy (and so allocates nothing).
func parseUint(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 { // 19 digits always fit in a uint64
		return 0, false
	}
	var n uint64
	for _, d := range b {
		if d < '0' || d > '9' {
			return 0, false
		}
		n = n*10 + uint64(d-'0')
	}
	return n, true
}
