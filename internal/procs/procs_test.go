package procs

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestStep: one processor until an interval uses more than Up; back to one
// only after Hold intervals in a row below Down (a busy interval between
// them starts the count again); nothing moves between the two marks.
func TestStep(t *testing.T) {
	f := &Follower{Max: 2}
	f.defaults()
	type s struct {
		used         float64
		cur, below   int
		next, below2 int
	}
	for _, tc := range []s{
		{0.2, 1, 0, 1, 0},
		{0.84, 1, 0, 1, 0},
		{0.9, 1, 0, 2, 0},
		{0.7, 2, 5, 2, 0},  // between the marks: stays, count restarts
		{0.5, 2, 0, 2, 1},  // below Down: counts
		{0.5, 2, 8, 2, 9},  // not yet
		{0.5, 2, 9, 1, 0},  // the Hold-th interval: shrinks
		{1.5, 2, 3, 2, 0},  // busy at the most: stays
		{0.05, 1, 0, 1, 0}, // idle at one: stays
	} {
		next, below := f.step(tc.cur, tc.used, tc.below)
		if next != tc.next || below != tc.below2 {
			t.Errorf("step(%d, %.2f, %d) = %d, %d; want %d, %d", tc.cur, tc.used, tc.below, next, below, tc.next, tc.below2)
		}
	}
}

// TestRunFollowsTheLoad: Run starts with one processor, grows to Max when
// the process's CPU use climbs, and returns to one after it stays low.
func TestRunFollowsTheLoad(t *testing.T) {
	cpus := make(chan time.Duration) // the CPU time Run reads, one value per read
	var set []int
	f := &Follower{Max: 2, Hold: 3,
		CPU: func() time.Duration { return <-cpus },
		Set: func(n int) { set = append(set, n) },
	}
	f.defaults()
	ticks := make(chan time.Time)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.run(ctx, ticks); close(done) }()
	var cpu time.Duration
	cpus <- cpu // Run's first reading
	at := time.Now()
	tick := func(used float64) {
		at = at.Add(f.Interval)
		cpu += time.Duration(used * float64(f.Interval))
		ticks <- at
		cpus <- cpu // Run has decided on the previous tick before it reads this
	}
	for _, used := range []float64{0.1, 0.95 /* grows */, 1.4, 0.3, 0.3, 0.3 /* third low: shrinks */, 0.3} {
		tick(used)
	}
	cancel()
	<-done
	if want := []int{1, 2, 1}; !slices.Equal(set, want) {
		t.Fatalf("GOMAXPROCS set to %v; want %v", set, want)
	}
}

// TestRunNeedsTwo: with at most one processor there is nothing to follow.
func TestRunNeedsTwo(t *testing.T) {
	called := false
	f := &Follower{Max: 1, Set: func(int) { called = true }}
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	f.Run(ctx)
	if called {
		t.Fatal("Run changed GOMAXPROCS with Max 1")
	}
}
