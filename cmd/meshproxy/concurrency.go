package main

import (
	"fmt"
	"runtime"
	"strconv"
)

// maxConcurrency bounds --concurrency.
const maxConcurrency = 1024

// defaultConcurrency is the sidecar's default --concurrency. A sidecar
// shares its pod's and node's CPUs with the application it serves, and its
// work is mostly system calls, which run outside the Go scheduler's
// processors whatever their number: one processor keeps the runtime from
// waking and spinning idle threads for every readied goroutine (measured in
// bench/RESULTS.md: about a quarter less CPU per kept-connection request
// and more requests per second on a two-core machine). Handshake-heavy
// sidecars (many new per-connection mTLS peers) can raise it.
const defaultConcurrency = 1

// concurrencyFlag is --concurrency: how many goroutines run Go code at once
// (GOMAXPROCS). 0 leaves the Go runtime's choice: $GOMAXPROCS if set, else
// the container's CPU limit or the machine's CPUs.
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
	case getenv("GOMAXPROCS") != "":
		return runtime.GOMAXPROCS(0), "GOMAXPROCS"
	default:
		runtime.GOMAXPROCS(c.n)
		return c.n, "default"
	}
}
