package fileread

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"
)

// Size caps per kind of file. A file over its cap is refused whole.
const (
	// MaxPEM bounds a PEM file: a certificate chain, a key, a trust bundle.
	MaxPEM = 1 << 20
	// MaxManifest bounds one policy or gateway manifest file (a Kubernetes
	// ConfigMap is at most 1 MiB; a hand-written file may be larger).
	MaxManifest = 4 << 20
	// MaxToken bounds a bearer token file (a projected ServiceAccount JWT
	// is a few KiB).
	MaxToken = 64 << 10
	// MaxTokensFile bounds the CA's bootstrap tokens file.
	MaxTokensFile = 4 << 20
	// MaxBundleDocument bounds a SPIFFE bundle (JWKS) document or file.
	MaxBundleDocument = 4 << 20
	// MaxLabels bounds a downward API labels file.
	MaxLabels = 1 << 20
	// MaxState bounds a small JSON state file the CA writes for itself.
	MaxState = 1 << 20
)

// Timeout bounds one Read: a file on a stalled network mount must not hold
// a reload (and what waits for it) forever.
const Timeout = 10 * time.Second

var (
	// ErrNotRegular is returned for anything but a regular file: a FIFO,
	// socket or device would block a read or never end.
	ErrNotRegular = errors.New("not a regular file")
	// ErrTooLarge is returned for a file over its size cap.
	ErrTooLarge = errors.New("file too large")
	// ErrTimeout is returned when a read takes longer than its deadline.
	ErrTimeout = errors.New("read timed out")
)

// Read reads the regular file at path, following symlinks, if it holds at
// most limit bytes, within Timeout. Errors name the path; a missing file
// is reported with fs.ErrNotExist in its chain.
func Read(path string, limit int64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	return ReadContext(ctx, path, limit)
}

// ReadContext is Read with the deadline of ctx instead of Timeout. When ctx
// ends first, the read is abandoned (it finishes in the background and its
// data is dropped) and ErrTimeout is returned.
func ReadContext(ctx context.Context, path string, limit int64) ([]byte, error) {
	type result struct {
		data []byte
		err  error
	}
	done := make(chan result, 1)
	go func() {
		data, err := read(path, limit)
		done <- result{data, err}
	}()
	select {
	case r := <-done:
		return r.data, r.err
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: %w: %w", path, ErrTimeout, ctx.Err())
	}
}

// read does the work of Read without the deadline.
func read(path string, limit int64) ([]byte, error) {
	// O_NONBLOCK: opening a FIFO without a writer would otherwise block.
	// It has no effect on reads of a regular file.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err // *fs.PathError names the path
	}
	defer f.Close()
	st, err := f.Stat() // the opened file, not whatever path names now
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: %w (%s)", path, ErrNotRegular, kind(st.Mode()))
	}
	if st.Size() > limit {
		return nil, &sizeError{fmt.Sprintf("%s: file is %d bytes, more than the %d allowed", path, st.Size(), limit)}
	}
	// The file may grow after the fstat: read at most one byte past the cap.
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, &sizeError{fmt.Sprintf("%s: file grew past the %d bytes allowed while being read", path, limit)}
	}
	return data, nil
}

// sizeError is an ErrTooLarge whose message says by how much.
type sizeError struct{ msg string }

func (e *sizeError) Error() string { return e.msg }
func (e *sizeError) Unwrap() error { return ErrTooLarge }

// kind names a non-regular file type for an error message.
func kind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeNamedPipe != 0:
		return "FIFO"
	case m&fs.ModeSocket != 0:
		return "socket"
	case m&fs.ModeCharDevice != 0:
		return "character device"
	case m&fs.ModeDevice != 0:
		return "device"
	default:
		return m.Type().String()
	}
}
