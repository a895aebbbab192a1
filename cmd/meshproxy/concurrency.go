package main

import (
	"fmt"
	"runtime"
	"strconv"
)

// maxConcurrency bounds --concurrency.
const maxConcurrency = 1024

// defaultConcurrency is the most processors (GOMAXPROCS) the sidecar takes
// by default, following its load from one (package procs; the Go runtime's
// choice when that is lower: a machine with one CPU). A sidecar shares its
// node's CPUs with the application it serves and most of its time is the
// kernel's (socket copies, TCP) and the cipher's: a second processor that
// is mostly idle costs a thread wake-up per burst (one processor: 1.1x the
// kept-connection requests/s at 0.9x the CPU, bench/RESULTS.md), and on a
// large node without a CPU limit the runtime would otherwise keep one
// processor per CPU. Two, while the load needs more than one CPU or moves
// bulk data, keep handshakes and a transfer's decryption and writes on two
// CPUs and the other connections' goroutines running beside a download;
// Istio's sidecars default to the same concurrency.
const defaultConcurrency = 2

// concurrencyFlag is --concurrency: how many goroutines run Go code at once
// (GOMAXPROCS). 0 leaves the Go runtime's choice: $GOMAXPROCS if set, else
// the container's CPU limit or the machine's CPUs. Not given, it follows
// the load from one up to defaultConcurrency or the runtime's choice,
// whichever is lower.
type concurrencyFlag struct {
	n   int
	set bool // given on the command line
}

// String is "auto" for the default (following the load), else the count.
func (c *concurrencyFlag) String() string {
	if !c.set {
		return "auto"
	}
	return strconv.Itoa(c.n)
}

// Set takes a count, 0 (the runtime's choice) or "auto" (the default).
func (c *concurrencyFlag) Set(s string) error {
	if s == "auto" {
		c.n, c.set = defaultConcurrency, false
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > maxConcurrency {
		return fmt.Errorf("want auto (the default), 0 (the Go runtime's choice) or 1..%d", maxConcurrency)
	}
	c.n, c.set = n, true
	return nil
}

func (c *concurrencyFlag) Type() string { return "auto|N" }

// restartedEnv marks a process that run re-executed so that the Go runtime
// starts with the processor count --concurrency wants (startCount).
const restartedEnv = "_MESHPROXY_RESTARTED"

// startCount is the processor count the Go runtime should have started
// with, when it started with another (started): the caller re-executes the
// binary with GOMAXPROCS set to it. A runtime that starts with more
// processors and gives them up keeps memory their start-up took (measured
// with one pooled connection: started with 64 and lowered to 2, 6.4 MB
// private against 3.9 MB started with 2; 8 to 2, 4.6 MB; 2 to 1, 4.2
// against 3.6 MB). Never when $GOMAXPROCS is set (the operator's choice, or
// a restarted process), nor for --concurrency 0 (the runtime's choice).
func (c *concurrencyFlag) startCount(getenv func(string) string, started int) (int, bool) {
	if getenv("GOMAXPROCS") != "" || c.set && c.n == 0 {
		return 0, false
	}
	want := c.n
	if !c.set {
		want = 1 // the default starts with one and follows the load (apply)
	}
	return want, want != started
}

// apply sets GOMAXPROCS from the flag: --concurrency given wins, then the
// GOMAXPROCS environment variable (the runtime has already applied it),
// then the default. It returns the value in effect, what chose it, and for
// the default the most processors the load may take (follow: package
// procs; 0 for a fixed count): one to start with, up to defaultConcurrency
// or the runtime's own choice at start, whichever is lower.
func (c *concurrencyFlag) apply(getenv func(string) string) (n int, from string, follow int) {
	switch {
	case c.set && c.n > 0:
		runtime.GOMAXPROCS(c.n)
		return c.n, "--concurrency", 0
	case c.set:
		return runtime.GOMAXPROCS(0), "Go runtime (--concurrency 0)", 0
	case getenv("GOMAXPROCS") != "" && getenv(restartedEnv) != "": // restarted by startCount
		started, err := strconv.Atoi(getenv(restartedEnv))
		if err != nil || started < 1 {
			started = 1
		}
		return c.startFollowing(started)
	case getenv("GOMAXPROCS") != "":
		return runtime.GOMAXPROCS(0), "GOMAXPROCS", 0
	default:
		return c.startFollowing(runtime.GOMAXPROCS(0))
	}
}

// startFollowing is the default: one processor, following the load up to
// defaultConcurrency or the runtime's start, whichever is lower.
func (c *concurrencyFlag) startFollowing(started int) (int, string, int) {
	runtime.GOMAXPROCS(1)
	if most := min(c.n, started); most > 1 {
		return 1, "default", most
	}
	return 1, "default", 0
}
