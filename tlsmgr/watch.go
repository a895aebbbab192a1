package tlsmgr

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
)

// debounce lets a writer finish a burst of changes (cert, then key, then
// the ..data symlink swap of a Kubernetes volume) before files are read.
const debounce = 100 * time.Millisecond

// watchFiles calls check after filesystem events in the directories of
// paths (watching directories, not files, so Kubernetes' atomic ..data
// symlink swaps are seen), once when the watches are in place, and every
// poll interval as a fallback. It returns when ctx ends. check itself
// decides whether anything really changed.
func watchFiles(ctx context.Context, paths []string, poll time.Duration, clock Clock, log *slog.Logger, check func()) {
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w, err := fsnotify.NewWatcher(); err != nil {
		log.Warn("file notifications unavailable, polling only", "error", err, "poll_interval", poll)
	} else {
		defer w.Close()
		dirs := map[string]bool{}
		for _, p := range paths {
			dir := filepath.Dir(p)
			if dirs[dir] {
				continue
			}
			dirs[dir] = true
			if err := w.Add(dir); err != nil {
				log.Warn("cannot watch directory, polling it", "dir", dir, "error", err, "poll_interval", poll)
			}
		}
		events, errs = w.Events, w.Errors
	}
	// Changes made before the watches existed have no event: look once now.
	check()
	var settle <-chan time.Time
	next := clock.After(poll)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle = time.After(debounce)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			log.Warn("file watch error", "error", err)
		case <-settle:
			settle = nil
			check()
		case <-next:
			next = clock.After(poll)
			check()
		}
	}
}

// readFiles reads paths and returns their contents and a digest of all of
// them; each error names its file.
func readFiles(paths ...string) ([][]byte, [sha256.Size]byte, error) {
	h := sha256.New()
	out := make([][]byte, len(paths))
	for i, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, [sha256.Size]byte{}, fmt.Errorf("read %s: %w", p, err)
		}
		out[i] = b
		fmt.Fprintf(h, "%d:", len(b))
		h.Write(b)
	}
	var sum [sha256.Size]byte
	copy(sum[:], h.Sum(nil))
	return out, sum, nil
}
