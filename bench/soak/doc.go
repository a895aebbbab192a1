// Command soak runs a meshproxy CA and a sidecar pair (the real binary) on
// loopback under mixed load for a long time, forcing certificate rotations
// on both sidecars at a fixed interval, and watches the sidecars for slow
// leaks. It is not part of CI:
//
//	go run ./bench/soak -duration 10m
//
// The load mixes new connections (one round trip each), kept connections
// (round trips at a steady pace), bulk streams (1 MiB chunks echoed back)
// and idle connections that are opened and closed in batches. Every
// -sample interval it prints each sidecar's resident memory (VmRSS),
// goroutines (pprof) and open descriptors, with the traffic so far.
//
// Verdict: the run passes when no request and no rotation failed and every
// series is flat. After the warm-up (the first quarter of the run, at least
// one sample), the samples are split in thirds; a series is flat when the
// median of the last third exceeds the median of the first third by no
// more than the allowance: 10% of the first third's median, but at least
// 8 MiB of RSS, 20 goroutines or 20 descriptors. A leak of one goroutine
// or a few KiB per connection grows far past that over minutes; steady
// state noise does not. The exit code is 0 on PASS, 1 on FAIL.
package main
