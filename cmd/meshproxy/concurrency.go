package main

import (
	"fmt"
	"runtime"
	"strconv"
)

// maxConcurrency bounds --concurrency.
const maxConcurrency = 1024

// defaultConcurrency caps the sidecar's GOMAXPROCS by default (the Go
// runtime's choice when that is lower: a machine with one CPU). A sidecar
// shares its node's CPUs with the application it serves and most of its
// time is the kernel's (socket copies, TCP) and the cipher's: on a large
// node without a CPU limit the runtime would otherwise keep one processor
// per CPU and wake and spin idle threads for them. Two keeps a
// bulk transfer's decryption and its writes on two CPUs (measured in
// bench/RESULTS.md: one processor saves a sixth of the CPU per
// kept-connection request, moved bulk throughput by -12% to +18% from run
// to run, lengthened the median of requests beside a download on a pooled
// connection by about a fifth, and the p99 of requests beside a
// per-connection bulk transfer from 11-20 ms to 33-38 ms). Istio's sidecars
// default to the same concurrency.
const defaultConcurrency = 2

// concurrencyFlag is --concurrency: how many goroutines run Go code at once
// (GOMAXPROCS). 0 leaves the Go runtime's choice: $GOMAXPROCS if set, else
// the container's CPU limit or the machine's CPUs. Not given, it is
// defaultConcurrency or the runtime's choice, whichever is lower.
type concurrencyFlag struct {
	n   int
	set bool // given on the command line
}

func (c *concurrencyFlag) String() string { return strconv.Itoa(c.n) }

func (c *concurrencyFlag) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > maxConcurrency {
		return fmt.Errorf("want 0 (the Go runtime's choice) or 1..%d", maxConcurrency)
	}
	c.n, c.set = n, true
	return nil
}

func (c *concurrencyFlag) Type() string { return "int" }

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
		want = min(c.n, started)
	}
	return want, want != started
}

// apply sets GOMAXPROCS from the flag: --concurrency given wins, then the
// GOMAXPROCS environment variable (the runtime has already applied it),
// then the default. It returns the value in effect and what chose it.
func (c *concurrencyFlag) apply(getenv func(string) string) (int, string) {
	switch {
	case c.set && c.n > 0:
		runtime.GOMAXPROCS(c.n)
		return c.n, "--concurrency"
	case c.set:
		return runtime.GOMAXPROCS(0), "Go runtime (--concurrency 0)"
	case getenv("GOMAXPROCS") != "" && getenv(restartedEnv) != "":
		return runtime.GOMAXPROCS(0), "default, set at start"
	case getenv("GOMAXPROCS") != "":
		return runtime.GOMAXPROCS(0), "GOMAXPROCS"
	default:
		n := min(c.n, runtime.GOMAXPROCS(0))
		runtime.GOMAXPROCS(n)
		return n, "default"
	}
}
