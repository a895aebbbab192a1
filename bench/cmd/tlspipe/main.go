// Command tlspipe is the comparison harness's reference proxy pair: a plain
// io.Copy in each direction over crypto/tls, with go-spiffe's mTLS
// configuration and Go's defaults otherwise (TLS 1.3, 32 KiB copy buffers,
// one TLS record per write). It is what a straightforward Go mTLS proxy
// does, the floor issue 17 measures meshproxy's data path against (peer
// go-tls in bench/harness). A benchmark tool, not a proxy to deploy.
//
//	tlspipe -mode server -listen ADDR -target APP -cert CHAIN -key KEY -bundle ROOT -peer-id SPIFFE-ID
//	tlspipe -mode client -listen ADDR -target SERVER ... -peer-id SPIFFE-ID
//
// The server accepts mTLS from -peer-id and forwards plaintext to -target;
// the client accepts plaintext and forwards over mTLS to the server, which
// must present -peer-id. Each side's end of a direction half-closes the
// other (TLS close_notify, TCP FIN), so uploads end cleanly. It serves
// until SIGINT or SIGTERM.
//
// With -records exporter the pair does not use crypto/tls past the
// handshake: it seals its own records with keys from the TLS exporter, with
// no user-space copy and up to 32 records (512 KiB) per system call
// (records.go).
// That is the least work an encrypting userspace proxy pair can do per
// byte: peer aead-floor, the machine's ceiling for the bulk figures.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

type options struct {
	mode, listen, target, cert, key, bundle, peerID, records string
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "", "server (mTLS in, plaintext to -target) or client (plaintext in, mTLS to -target)")
	flag.StringVar(&o.listen, "listen", "", "address to listen on (loopback)")
	flag.StringVar(&o.target, "target", "", "address to forward to (loopback)")
	flag.StringVar(&o.cert, "cert", "", "PEM certificate chain (X.509-SVID, leaf first)")
	flag.StringVar(&o.key, "key", "", "PEM private key of the SVID")
	flag.StringVar(&o.bundle, "bundle", "", "PEM trust bundle (roots) of the peer's trust domain")
	flag.StringVar(&o.peerID, "peer-id", "", "SPIFFE ID the peer must present")
	flag.StringVar(&o.records, "records", "tls", "tls (crypto/tls records, io.Copy) or exporter (own records keyed by the TLS exporter: a benchmark floor, not a protocol to deploy; both ends must agree)")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "tlspipe:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	for _, a := range []struct{ flag, addr string }{{"-listen", o.listen}, {"-target", o.target}} {
		host, _, err := net.SplitHostPort(a.addr)
		if err != nil {
			return fmt.Errorf("%s %q: %w", a.flag, a.addr, err)
		}
		if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
			return fmt.Errorf("%s %q: want a loopback address", a.flag, a.addr)
		}
	}
	if o.records != "tls" && o.records != "exporter" {
		return fmt.Errorf("-records %q: want tls or exporter", o.records)
	}
	exporter := o.records == "exporter"
	peer, err := spiffeid.FromString(o.peerID)
	if err != nil {
		return fmt.Errorf("-peer-id: %w", err)
	}
	svid, err := x509svid.Load(o.cert, o.key)
	if err != nil {
		return fmt.Errorf("load SVID: %w", err)
	}
	bundle, err := x509bundle.Load(peer.TrustDomain(), o.bundle)
	if err != nil {
		return fmt.Errorf("load bundle: %w", err)
	}
	authorize := tlsconfig.AuthorizeID(peer)
	var (
		cfg  *tls.Config
		dial func(ctx context.Context) (net.Conn, error)
	)
	switch o.mode {
	case "server":
		cfg = tlsconfig.MTLSServerConfig(svid, bundle, authorize)
		cfg.MinVersion = tls.VersionTLS13
		// Exporter records follow the handshake at once: no session
		// ticket may sit between them.
		cfg.SessionTicketsDisabled = exporter
		var d net.Dialer
		dial = func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", o.target) }
	case "client":
		cfg = tlsconfig.MTLSClientConfig(svid, bundle, authorize)
		cfg.MinVersion = tls.VersionTLS13
		d := tls.Dialer{Config: cfg}
		dial = func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", o.target) }
	default:
		return fmt.Errorf("-mode %q: want server or client", o.mode)
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return err
	}
	if o.mode == "server" {
		ln = tls.NewListener(ln, cfg)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	context.AfterFunc(ctx, func() { ln.Close() })
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		wg.Go(func() {
			if err := relay(ctx, c, dial, exporter); err != nil {
				slog.Debug("connection failed", "err", err)
			}
		})
	}
}

// relay forwards c to a connection dial opens, an io.Copy each way (or
// exporter records); a direction that ends half-closes where it wrote.
func relay(ctx context.Context, c net.Conn, dial func(context.Context) (net.Conn, error), exporter bool) error {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if tc, ok := c.(*tls.Conn); ok {
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("handshake: %w", err)
		}
	}
	up, err := dial(ctx)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer up.Close()
	if exporter {
		if tc, ok := c.(*tls.Conn); ok {
			return relayRecords(tc, up, true)
		}
		return relayRecords(up.(*tls.Conn), c, false)
	}
	half := func(dst, src net.Conn) func() error {
		return func() error {
			_, err := io.Copy(dst, src)
			return closeWriteAfter(dst, err)
		}
	}
	return bothWays(func() { c.Close(); up.Close() }, half(up, c), half(c, up))
}

// bothWays runs the two directions of a relay and returns when both have
// ended; a direction that fails ends the other too (closeAll).
func bothWays(closeAll func(), a, b func() error) error {
	errs := make(chan error, 2)
	go func() { errs <- a() }()
	go func() { errs <- b() }()
	first := <-errs
	if first != nil {
		closeAll()
	}
	return errors.Join(first, <-errs)
}

// closeWriteAfter half-closes dst, where a direction that ended with err
// wrote, if it can: the other end learns that the direction is over.
func closeWriteAfter(dst net.Conn, err error) error {
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		err = errors.Join(err, cw.CloseWrite())
	}
	return err
}
