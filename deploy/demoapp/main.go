// Command demoapp is the demo's workload, one static binary in a scratch
// image so the demo needs no image from a registry:
//
//	demoapp serve -listen :5678 -text "hello"   answer every HTTP request with the text
//	                                            (after ?hold=DURATION, at most 1m)
//	    [-tls-cert F -tls-key F]                over TLS with that certificate
//	demoapp get [-method POST] URL              one request; body to stdout, exit 1 unless 2xx
//	demoapp loop [-every 5s] URL                request URL forever, one line per result
//	demoapp sleep                               wait for SIGTERM (a pod to exec into)
//
// Each loop line is "ok STATUS BODY" or "request failed: ERROR", so tests
// can count failures in the container's log.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const usage = "usage: demoapp serve|get|loop|sleep [flags]"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demoapp:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	switch args[0] {
	case "serve":
		listen := fs.String("listen", ":5678", "address to serve HTTP on")
		text := fs.String("text", "hello", "body of every response")
		cert := fs.String("tls-cert", "", "serve HTTPS with this PEM certificate chain (with -tls-key)")
		key := fs.String("tls-key", "", "PEM private key of -tls-cert")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if (*cert == "") != (*key == "") {
			return errors.New("serve: -tls-cert and -tls-key go together")
		}
		return serve(ctx, *listen, *text, *cert, *key)
	case "get":
		method := fs.String("method", http.MethodGet, "HTTP method")
		timeout := fs.Duration("timeout", 10*time.Second, "time limit for the request")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if fs.NArg() != 1 {
			return errors.New("get: want one URL")
		}
		status, body, err := request(ctx, *method, fs.Arg(0), *timeout)
		if err != nil {
			return err
		}
		fmt.Fprint(out, body)
		if status < 200 || status > 299 {
			return fmt.Errorf("get %s: status %d", fs.Arg(0), status)
		}
		return nil
	case "loop":
		every := fs.Duration("every", 5*time.Second, "pause between requests")
		timeout := fs.Duration("timeout", 5*time.Second, "time limit for each request")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if fs.NArg() != 1 {
			return errors.New("loop: want one URL")
		}
		return loop(ctx, out, fs.Arg(0), *every, *timeout)
	case "sleep":
		<-ctx.Done()
		return nil
	}
	return errors.New(usage)
}

func serve(ctx context.Context, listen, text, certFile, keyFile string) error {
	srv := &http.Server{
		Addr:              listen,
		ReadHeaderTimeout: 10 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// ?hold=DURATION (at most a minute) keeps the connection open
			// before answering, so a test can see it among a proxy's peers.
			if d, err := time.ParseDuration(r.URL.Query().Get("hold")); err == nil && d > 0 && d <= time.Minute {
				select {
				case <-time.After(d):
				case <-r.Context().Done():
					return
				}
			}
			fmt.Fprintln(w, text)
		}),
	}
	errc := make(chan error, 1)
	go func() {
		if certFile != "" {
			errc <- srv.ListenAndServeTLS(certFile, keyFile)
			return
		}
		errc <- srv.ListenAndServe()
	}()
	slog.Info("serving", "listen", listen, "tls", certFile != "")
	select {
	case err := <-errc:
		return fmt.Errorf("serve %s: %w", listen, err)
	case <-ctx.Done():
		shut, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shut)
	}
}

// client keeps no idle connections: each request is a new connection, so
// each one crosses the sidecars' capture and handshake anew.
var client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

func request(ctx context.Context, method, url string, timeout time.Duration) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return 0, "", fmt.Errorf("request %s: %w", url, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return resp.StatusCode, "", fmt.Errorf("read %s: %w", url, err)
	}
	return resp.StatusCode, string(body), nil
}

func loop(ctx context.Context, out io.Writer, url string, every, timeout time.Duration) error {
	for {
		status, body, err := request(ctx, http.MethodGet, url, timeout)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			fmt.Fprintf(out, "request failed: %v\n", err)
		case status < 200 || status > 299:
			fmt.Fprintf(out, "request failed: status %d\n", status)
		default:
			fmt.Fprintf(out, "ok %d %s\n", status, strings.TrimSpace(body))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(every):
		}
	}
}
