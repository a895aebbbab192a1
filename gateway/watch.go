package gateway

import (
	"context"
	"log/slog"
	"time"

	"github.com/fsnotify/fsnotify"
)

// settleDelay lets a burst of filesystem events (a ConfigMap or Secret
// volume swap is several; a cert and its key are two writes) finish before
// the files are read.
const settleDelay = 100 * time.Millisecond

// watchDirs calls check after filesystem events in dirs (watching the
// directories, so Kubernetes' atomic ..data symlink swaps are seen), and
// every poll interval as a fallback, until ctx ends. check decides itself
// whether anything really changed.
func watchDirs(ctx context.Context, dirs []string, poll time.Duration, log *slog.Logger, check func()) {
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w, err := fsnotify.NewWatcher(); err != nil {
		log.Warn("file notifications unavailable, polling only", "err", err, "poll_interval", poll)
	} else {
		defer w.Close()
		for _, d := range dirs {
			if err := w.Add(d); err != nil {
				log.Warn("cannot watch directory, polling it", "dir", d, "err", err, "poll_interval", poll)
			}
		}
		events, errs = w.Events, w.Errors
	}
	// Changes made before the watches existed have no event: look once now.
	check()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	settle := time.NewTimer(settleDelay)
	settle.Stop()
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle.Reset(settleDelay)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			log.Warn("file watch error; polling continues", "err", err)
		case <-settle.C:
			check()
		case <-tick.C:
			check()
		}
	}
}
