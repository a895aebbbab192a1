package main

import (
	"fmt"
	"io"
	"slices"
	"time"
)

// usage is one sidecar's resources at a sample.
type usage struct {
	rssKiB     int64
	goroutines int
	fds        int
}

// sample is every sidecar's usage and the traffic so far at one moment.
type sample struct {
	at                            time.Duration
	sides                         []usage
	newConns, roundTrips, bulkMiB int64
	idle, rotations, failures     int64
}

func takeSample(at time.Duration, sides []*sidecar, st *stats) (sample, error) {
	s := sample{at: at, newConns: st.newConns.Load(), roundTrips: st.roundTrips.Load(),
		bulkMiB: st.bulkBytes.Load() >> 20, idle: st.idleOpened.Load(), rotations: st.rotations.Load(),
		failures: st.failures.Load() + st.rotationFailures.Load()}
	for _, sc := range sides {
		var u usage
		var err error
		if u.rssKiB, err = sc.proc.rssKiB(); err != nil {
			return s, fmt.Errorf("%s rss: %w", sc.name, err)
		}
		if u.goroutines, err = sc.goroutines(); err != nil {
			return s, fmt.Errorf("%s goroutines: %w", sc.name, err)
		}
		if u.fds, err = sc.proc.fds(); err != nil {
			return s, fmt.Errorf("%s descriptors: %w", sc.name, err)
		}
		s.sides = append(s.sides, u)
	}
	return s, nil
}

func printHeader() {
	fmt.Printf("%8s  %-24s  %-24s  %9s %10s %8s %6s %5s %5s\n", "elapsed", "client rss/gor/fds", "server rss/gor/fds",
		"new conns", "round trips", "bulk MiB", "idle", "rot", "fail")
}

func (s sample) print() {
	side := func(u usage) string {
		return fmt.Sprintf("%6.1fMiB %5d %5d", float64(u.rssKiB)/1024, u.goroutines, u.fds)
	}
	fmt.Printf("%8s  %-24s  %-24s  %9d %10d %8d %6d %5d %5d\n", s.at.Round(time.Second), side(s.sides[0]), side(s.sides[1]),
		s.newConns, s.roundTrips, s.bulkMiB, s.idle, s.rotations, s.failures)
}

// series is one resource of one sidecar over the samples.
type series struct {
	name  string
	unit  string
	vals  []float64
	floor float64 // the allowance never goes below this
}

// flatness compares the median of the last third with that of the first
// third of vals; the allowance is 10% of the first third's median, at
// least floor.
func flatness(vals []float64, floor float64) (first, last, allowance float64, flat bool) {
	n := len(vals) / 3
	if n == 0 {
		n = 1
	}
	first, last = median(vals[:n]), median(vals[len(vals)-n:])
	allowance = max(first/10, floor)
	return first, last, allowance, last-first <= allowance
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// warmup is how many leading samples the verdict ignores: a quarter of
// them, at least one.
func warmup(n int) int { return max(1, n/4) }

// verdict prints the judgement of a soak and reports whether it passed.
func verdict(w io.Writer, samples []sample, st *stats, sides int) bool {
	pass := true
	fmt.Fprintln(w)
	if len(samples) < 4 {
		fmt.Fprintf(w, "FAIL: %d samples, too few to judge\n", len(samples))
		return false
	}
	if f := st.failures.Load(); f > 0 {
		fmt.Fprintf(w, "FAIL: %d requests failed; first: %v\n", f, st.firstFailure.Load())
		pass = false
	}
	if f := st.rotationFailures.Load(); f > 0 {
		fmt.Fprintf(w, "FAIL: %d forced rotations failed\n", f)
		pass = false
	}
	judged := samples[warmup(len(samples)):]
	names := []string{"client", "server"}
	for i := range sides {
		for _, s := range []series{
			{name: "rss", unit: "MiB", floor: 8},
			{name: "goroutines", floor: 20},
			{name: "descriptors", floor: 20},
		} {
			for _, smp := range judged {
				u := smp.sides[i]
				switch s.name {
				case "rss":
					s.vals = append(s.vals, float64(u.rssKiB)/1024)
				case "goroutines":
					s.vals = append(s.vals, float64(u.goroutines))
				default:
					s.vals = append(s.vals, float64(u.fds))
				}
			}
			first, last, allow, flat := flatness(s.vals, s.floor)
			mark := "flat"
			if !flat {
				mark, pass = "GROWING", false
			}
			fmt.Fprintf(w, "%-6s %-11s first third %8.1f%s, last third %8.1f%s, allowance +%.1f: %s\n",
				names[i], s.name, first, s.unit, last, s.unit, allow, mark)
		}
	}
	last := samples[len(samples)-1]
	fmt.Fprintf(w, "traffic: %d new connections, %d round trips on kept connections, %d MiB bulk, %d idle connections, %d rotations\n",
		last.newConns, last.roundTrips, last.bulkMiB, last.idle, st.rotations.Load())
	if pass {
		fmt.Fprintln(w, "PASS: no failures; RSS, goroutines and descriptors flat after the warm-up")
	} else {
		fmt.Fprintln(w, "FAIL")
	}
	return pass
}
