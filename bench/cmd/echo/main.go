// Command echo is the app behind the proxy pairs of the comparison harness:
// it echoes (first byte 'E'), streams a fixed pattern (first byte 'D') or
// takes an upload and answers with its byte count ('U'; 'V' also checks
// every byte), see bench/harness. It runs as its own process so its CPU is not charged
// to the harness or to a proxy.
//
//	echo -listen 127.0.0.1:0
//
// prints "listening ADDR" once bound and serves until SIGINT or SIGTERM.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshproxy/meshproxy/bench/harness"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback)")
	flag.Parse()
	if err := run(*listen); err != nil {
		fmt.Fprintln(os.Stderr, "echo:", err)
		os.Exit(1)
	}
}

func run(listen string) error {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("-listen %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("-listen %q: want a loopback address", listen)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	return harness.ServeEcho(ctx, ln)
}
