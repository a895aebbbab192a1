package tlsmgr

import (
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"time"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/internal/watch"
)

// watchFiles calls check after changes in the directories of paths, once
// when the watches are in place, and every poll interval (on clock) as a
// fallback, until ctx ends. check itself decides whether anything really
// changed.
func watchFiles(ctx context.Context, paths []string, poll time.Duration, clock Clock, log *slog.Logger, check func()) {
	watch.Run(ctx, watch.DirsOf(paths...), check,
		watch.WithPoll(poll), watch.WithPollTimer(clock.After), watch.WithLogger(log))
}

// readFiles reads the PEM files at paths (regular files of at most
// fileread.MaxPEM bytes) and returns their contents and a digest of all of
// them; each error names its file.
func readFiles(paths ...string) ([][]byte, [sha256.Size]byte, error) {
	h := sha256.New()
	out := make([][]byte, len(paths))
	for i, p := range paths {
		b, err := fileread.Read(p, fileread.MaxPEM)
		if err != nil {
			return nil, [sha256.Size]byte{}, err // names the file
		}
		out[i] = b
		fmt.Fprintf(h, "%d:", len(b))
		h.Write(b)
	}
	var sum [sha256.Size]byte
	copy(sum[:], h.Sum(nil))
	return out, sum, nil
}
