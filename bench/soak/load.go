package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// stats counts the traffic and failures of a soak.
type stats struct {
	newConns, roundTrips, bulkBytes, idleOpened atomic.Int64
	failures, rotations, rotationFailures       atomic.Int64
	firstFailure                                atomic.Value
}

func (s *stats) fail(ctx context.Context, what string, err error) {
	if ctx.Err() != nil {
		return // the run is ending: connections cut by it are no failure
	}
	if s.failures.Add(1) <= 5 {
		fmt.Printf("failure: %s: %v\n", what, err)
	}
	s.firstFailure.CompareAndSwap(nil, what+": "+err.Error())
}

// startLoad runs every load generator until ctx ends; the channel closes
// when all have stopped.
func startLoad(ctx context.Context, c config, entry string, st *stats) <-chan struct{} {
	var wg sync.WaitGroup
	for w := range c.newConnWorkers {
		wg.Go(func() { newConnLoad(ctx, entry, w, st) })
	}
	for k := range c.keptConns {
		wg.Go(func() { keptConnLoad(ctx, entry, k, st) })
	}
	for b := range c.bulk {
		wg.Go(func() { bulkLoad(ctx, entry, b, st) })
	}
	if c.idleBatch > 0 {
		wg.Go(func() { idleLoad(ctx, entry, c.idleBatch, st) })
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	return done
}

func dial(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{Timeout: 10 * time.Second}
	return d.DialContext(ctx, "tcp", addr)
}

// closeOnDone closes c when ctx ends, so blocked reads end with the run.
func closeOnDone(ctx context.Context, c net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { c.Close() })
}

func echoLine(c net.Conn, r *bufio.Reader, msg string) error {
	_ = c.SetDeadline(time.Now().Add(time.Minute))
	if _, err := io.WriteString(c, msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// newConnLoad opens a connection per round trip.
func newConnLoad(ctx context.Context, entry string, w int, st *stats) {
	for i := 0; ctx.Err() == nil; i++ {
		c, err := dial(ctx, entry)
		if err != nil {
			st.fail(ctx, "new connection dial", err)
			continue
		}
		stop := closeOnDone(ctx, c)
		err = echoLine(c, bufio.NewReader(c), fmt.Sprintf("new %d %d\n", w, i))
		stop()
		c.Close()
		if err != nil {
			st.fail(ctx, "new connection", err)
			continue
		}
		st.newConns.Add(1)
	}
}

// keptConnLoad does a round trip every 50 ms on one connection, reopening
// it only after a failure.
func keptConnLoad(ctx context.Context, entry string, k int, st *stats) {
	for ctx.Err() == nil {
		c, err := dial(ctx, entry)
		if err != nil {
			st.fail(ctx, "kept connection dial", err)
			time.Sleep(time.Second)
			continue
		}
		stop := closeOnDone(ctx, c)
		r := bufio.NewReader(c)
		for i := 0; ctx.Err() == nil; i++ {
			if err := echoLine(c, r, fmt.Sprintf("kept %d %d\n", k, i)); err != nil {
				st.fail(ctx, "kept connection", err)
				break
			}
			st.roundTrips.Add(1)
			time.Sleep(50 * time.Millisecond)
		}
		stop()
		c.Close()
	}
}

// bulkLoad echoes 1 MiB chunks on one connection and checks them.
func bulkLoad(ctx context.Context, entry string, b int, st *stats) {
	chunk := bytes.Repeat([]byte{byte('a' + b%26)}, 1<<20)
	got := make([]byte, len(chunk))
	for ctx.Err() == nil {
		c, err := dial(ctx, entry)
		if err != nil {
			st.fail(ctx, "bulk dial", err)
			time.Sleep(time.Second)
			continue
		}
		stop := closeOnDone(ctx, c)
		for ctx.Err() == nil {
			_ = c.SetDeadline(time.Now().Add(time.Minute))
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(chunk)
				errc <- err
			}()
			_, rerr := io.ReadFull(c, got)
			werr := <-errc
			if err := firstErr(werr, rerr); err != nil {
				st.fail(ctx, "bulk", err)
				break
			}
			if !bytes.Equal(got, chunk) {
				st.fail(ctx, "bulk", fmt.Errorf("echoed chunk differs"))
				break
			}
			st.bulkBytes.Add(int64(len(chunk)))
		}
		stop()
		c.Close()
	}
}

// idleLoad holds batches of idle connections for 20 s, then replaces them.
func idleLoad(ctx context.Context, entry string, n int, st *stats) {
	for ctx.Err() == nil {
		var held []net.Conn
		for range n {
			c, err := dial(ctx, entry)
			if err != nil {
				st.fail(ctx, "idle dial", err)
				break
			}
			held = append(held, c)
			st.idleOpened.Add(1)
		}
		select {
		case <-ctx.Done():
		case <-time.After(20 * time.Second):
		}
		for _, c := range held {
			c.Close()
		}
	}
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}
