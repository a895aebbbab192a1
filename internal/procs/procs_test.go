package procs

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"
)

// TestStep: one processor until an interval uses more than Up CPUs or
// reads bulk data; back to one only after Hold quiet intervals in a row
// (below Down, no bulk data; a busy interval between them starts the count
// again); nothing moves between the two marks.
func TestStep(t *testing.T) {
	f := &Follower{Max: 2}
	f.defaults()
	type s struct {
		used         float64
		bulk         bool
		cur, quiet   int
		next, quiet2 int
	}
	for _, tc := range []s{
		{0.2, false, 1, 0, 1, 0},
		{0.84, false, 1, 0, 1, 0},
		{0.9, false, 1, 0, 2, 0},
		{0.3, true, 1, 0, 2, 0},   // a download at low CPU: grows
		{0.7, false, 2, 5, 2, 0},  // between the marks: stays, count restarts
		{0.5, false, 2, 0, 2, 1},  // below Down: counts
		{0.5, false, 2, 8, 2, 9},  // not yet
		{0.5, false, 2, 9, 1, 0},  // the Hold-th interval: shrinks
		{0.3, true, 2, 9, 2, 0},   // bulk data at low CPU: stays, count restarts
		{1.5, false, 2, 3, 2, 0},  // busy at the most: stays
		{0.05, false, 1, 0, 1, 0}, // idle at one: stays
	} {
		next, quiet := f.step(tc.cur, Sample{CPUs: tc.used, Bulk: tc.bulk}, tc.quiet)
		if next != tc.next || quiet != tc.quiet2 {
			t.Errorf("step(%d, %.2f bulk %v, %d) = %d, %d; want %d, %d", tc.cur, tc.used, tc.bulk, tc.quiet, next, quiet, tc.next, tc.quiet2)
		}
	}
}

// TestSampleBulk: reads are bulk at BulkRate bytes a second or more and
// BulkRead bytes per read or more on average; many small reads (requests)
// and a few large ones (a trickle) are not, nor is anything when the
// counters are unknown or went back.
func TestSampleBulk(t *testing.T) {
	f := &Follower{}
	f.defaults()
	at := time.Unix(1000, 0)
	last := reading{at: at, read: 1 << 30, calls: 1000, ioOK: true}
	for _, tc := range []struct {
		name        string
		read, calls uint64
		ok          bool
		want        bool
	}{
		{"download", 100 << 20, 3000, true, true},    // 500 MB/s, 35 KB per read
		{"requests", 100 << 20, 100000, true, false}, // 500 MB/s of 1 KiB reads
		{"trickle", 1 << 20, 10, true, false},        // 5 MB/s of large reads
		{"just bulk", 6_400_000, 390, true, true},    // 32 MB/s, 16.4 KB per read
		{"unknown", 100 << 20, 3000, false, false},   // no /proc/self/io
		{"no reads", 0, 0, true, false},
	} {
		cur := reading{at: at.Add(200 * time.Millisecond), read: last.read + tc.read, calls: last.calls + tc.calls, ioOK: tc.ok}
		if got := f.sample(last, cur).Bulk; got != tc.want {
			t.Errorf("%s: bulk %v, want %v", tc.name, got, tc.want)
		}
	}
	back := reading{at: at.Add(200 * time.Millisecond), read: 0, calls: 5000, ioOK: true}
	if f.sample(last, back).Bulk {
		t.Error("counters that went back read as bulk")
	}
	if got := f.sample(last, reading{at: at.Add(200 * time.Millisecond), cpu: 100 * time.Millisecond}).CPUs; got != 0.5 {
		t.Errorf("100 ms of CPU in 200 ms = %.2f CPUs, want 0.5", got)
	}
}

// TestParseIO reads /proc/PID/io's format, and fails closed on anything else.
func TestParseIO(t *testing.T) {
	text := "rchar: 6976\nwchar: 0\nsyscr: 10\nsyscw: 0\nread_bytes: 8192\nwrite_bytes: 0\ncancelled_write_bytes: 0\n"
	if r, c, ok := parseIO([]byte(text)); !ok || r != 6976 || c != 10 {
		t.Fatalf("parseIO = %d, %d, %v; want 6976, 10, true", r, c, ok)
	}
	for _, bad := range []string{"", "rchar: 5\n", "syscr: 5\n", "rchar: x\nsyscr: 5\n", "rchar 5\nsyscr 5\n",
		"rchar: -5\nsyscr: 5\n", "rchar: 5\nsyscr: 99999999999999999999\n"} {
		if _, _, ok := parseIO([]byte(bad)); ok {
			t.Errorf("parseIO(%q) ok, want not", bad)
		}
	}
	// This machine's own file, if it has one, parses and moves with reads.
	c, err := openIOCounters()
	if err != nil {
		if _, serr := os.Stat("/proc/self/io"); serr == nil {
			t.Fatalf("/proc/self/io exists but does not open: %v", err)
		}
		t.Skip("no /proc/self/io (kernel without task I/O accounting)")
	}
	defer c.close()
	r1, c1, ok := c.read()
	if !ok {
		t.Fatal("/proc/self/io exists but did not parse")
	}
	if _, err := os.ReadFile("/proc/self/stat"); err != nil {
		t.Fatal(err)
	}
	r2, c2, _ := c.read()
	if r2 <= r1 || c2 <= c1 {
		t.Fatalf("/proc/self/io did not count a file read: rchar %d -> %d, syscr %d -> %d", r1, r2, c1, c2)
	}
}

// TestSamplingAllocatesNothing: the default readings of CPU time and read
// counters allocate nothing, so that a follower sampling five times a
// second leaves an idle process idle to memtrim's idle release (which
// waits for an interval with next to no allocation; reading the file anew
// each time allocated ~10 KB a second, which with the release's first
// threshold, 64 KB in 30 s, kept every default sidecar from ever releasing).
func TestSamplingAllocatesNothing(t *testing.T) {
	c, err := openIOCounters()
	if err != nil {
		t.Skipf("no /proc/self/io (kernel without task I/O accounting): %v", err)
	}
	defer c.close()
	f := &Follower{Max: 2, IO: c.read}
	f.defaults()
	var ok bool
	allocs := testing.AllocsPerRun(100, func() {
		r := f.read(time.Now())
		ok = r.ioOK && r.cpu > 0 && r.read > 0
	})
	if !ok {
		t.Fatal("a reading did not give CPU time and read counters")
	}
	if allocs != 0 {
		t.Fatalf("a reading allocates %.1f times, want none", allocs)
	}
}

// TestRunFollowsTheLoad: Run starts with one processor, grows to Max when
// the process's CPU use climbs, and returns to one after it stays low; a
// download at low CPU grows it too and holds it while it lasts.
func TestRunFollowsTheLoad(t *testing.T) {
	type counters struct {
		cpu         time.Duration
		read, calls uint64
	}
	vals := make(chan counters) // one per reading Run makes, CPU first
	var io counters
	var set []int
	f := &Follower{Max: 2, Hold: 3,
		CPU: func() time.Duration { io = <-vals; return io.cpu },
		IO:  func() (uint64, uint64, bool) { return io.read, io.calls, true },
		Set: func(n int) { set = append(set, n) },
	}
	f.defaults()
	ticks := make(chan time.Time)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.run(ctx, ticks); close(done) }()
	var c counters
	vals <- c // Run's first reading
	at := time.Now()
	const mb = 1 << 20
	for _, l := range []struct {
		used        float64
		read, calls uint64
	}{
		{0.1, 0, 0}, {0.95, 0, 0} /* grows */, {1.4, 0, 0}, {0.3, 0, 0}, {0.3, 0, 0}, {0.3, 0, 0}, /* third quiet: shrinks */
		{0.3, 100 * mb, 3000} /* a download: grows */, {0.3, 100 * mb, 3000}, {0.3, 100 * mb, 3000}, {0.3, 100 * mb, 3000}, /* held */
		{0.3, mb, 1000}, {0.3, mb, 1000}, {0.3, mb, 1000} /* third quiet: shrinks */, {0.3, 0, 0},
	} {
		at = at.Add(f.Interval)
		c.cpu += time.Duration(l.used * float64(f.Interval))
		c.read += l.read
		c.calls += l.calls
		ticks <- at
		vals <- c // Run has decided on the previous tick before it reads this
	}
	cancel()
	<-done
	if want := []int{1, 2, 1, 2, 1}; !slices.Equal(set, want) {
		t.Fatalf("GOMAXPROCS set to %v; want %v", set, want)
	}
}

// TestRunWithoutReadCounters: without /proc/self/io a download would look
// like idle time, so Run keeps the most processors and does not follow.
func TestRunWithoutReadCounters(t *testing.T) {
	var set []int
	f := &Follower{Max: 2,
		IO:  func() (uint64, uint64, bool) { return 0, 0, false },
		Set: func(n int) { set = append(set, n) },
	}
	if f.Run(context.Background()) {
		t.Fatal("Run followed the load without read counters")
	}
	if !slices.Equal(set, []int{2}) {
		t.Fatalf("GOMAXPROCS set to %v; want [2]", set)
	}
}

// TestRunNeedsTwo: with at most one processor there is nothing to follow.
func TestRunNeedsTwo(t *testing.T) {
	called := false
	f := &Follower{Max: 1, Set: func(int) { called = true }}
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	if f.Run(ctx) || called {
		t.Fatal("Run changed GOMAXPROCS with Max 1")
	}
}
