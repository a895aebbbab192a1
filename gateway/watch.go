package gateway

import (
	"context"
	"log/slog"
	"time"

	"github.com/meshproxy/meshproxy/internal/watch"
)

// watchDirs calls check after filesystem events in dirs (watching the
// directories, so Kubernetes' atomic ..data symlink swaps are seen), and
// every poll interval as a fallback, until ctx ends. check decides itself
// whether anything really changed.
func watchDirs(ctx context.Context, dirs []string, poll time.Duration, log *slog.Logger, check func()) {
	watch.Run(ctx, dirs, check, watch.WithPoll(poll), watch.WithLogger(log))
}
