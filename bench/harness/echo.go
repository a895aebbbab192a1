package harness

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// The echo app's protocol: the first byte a client sends picks the mode.
const (
	// ModeEcho: every byte after the mode byte is sent back until EOF.
	ModeEcho byte = 'E'
	// ModeDownload: the app streams Pattern repeatedly until the client
	// goes away; the client counts (and may check) what arrives.
	ModeDownload byte = 'D'
	// ModeUpload: the client streams Pattern and half-closes; the app reads
	// to EOF and answers with the number of bytes it received (8 bytes,
	// big-endian), then closes. The client compares it with what it sent:
	// a proxy that loses the tail of an upload, or never passes the
	// half-close on, fails the run.
	ModeUpload byte = 'U'
	// ModeUploadChecked is ModeUpload with every byte checked against
	// Pattern: on the first that differs the app closes without an answer.
	ModeUploadChecked byte = 'V'
)

// patternSize is the length of Pattern; a power of two so offsets wrap cheaply.
const patternSize = 64 << 10

// Pattern is the block the app streams in ModeDownload: deterministic and
// not compressible, so a client can check every byte it receives.
var Pattern = func() []byte {
	b := make([]byte, patternSize)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}()

// ServeEcho runs the echo app on ln until ctx ends or ln fails. Every
// connection is closed when it returns.
func ServeEcho(ctx context.Context, ln net.Listener) error {
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer func() {
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("echo accept: %w", err)
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveEchoConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
}

func serveEchoConn(c net.Conn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case ModeEcho:
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case ModeDownload:
		for {
			if _, err := c.Write(Pattern); err != nil {
				return
			}
		}
	case ModeUpload, ModeUploadChecked:
		n, ok := receiveUpload(c, mode[0] == ModeUploadChecked)
		if !ok {
			return
		}
		var count [8]byte
		binary.BigEndian.PutUint64(count[:], uint64(n))
		_, _ = c.Write(count[:])
	}
}

// receiveUpload reads c to EOF, counting (and, with check, checking) what
// arrives; ok is false if the connection failed or a byte differed.
func receiveUpload(c net.Conn, check bool) (n int64, ok bool) {
	buf := make([]byte, 256<<10)
	for {
		m, err := c.Read(buf)
		if check && m > 0 && !matchesPattern(buf[:m], n) {
			return n, false
		}
		n += int64(m)
		switch {
		case errors.Is(err, io.EOF):
			return n, true
		case err != nil:
			return n, false
		}
	}
}
