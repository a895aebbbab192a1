package watch

import (
	"context"
	"log/slog"
	"path/filepath"
	"slices"
	"time"

	"github.com/fsnotify/fsnotify"
)

const (
	// DefaultDebounce lets a writer finish a burst of changes (a cert,
	// then its key, then the ..data symlink swap) before check runs.
	DefaultDebounce = 100 * time.Millisecond
	// DefaultPoll is the fallback check interval.
	DefaultPoll = 30 * time.Second
)

type options struct {
	poll     time.Duration
	debounce time.Duration
	log      *slog.Logger
	after    func(time.Duration) <-chan time.Time
	noFirst  bool
}

// Option configures Run.
type Option func(*options)

// WithPoll sets the fallback check interval (DefaultPoll); d <= 0 keeps it.
func WithPoll(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.poll = d
		}
	}
}

// WithDebounce sets how long events must pause before check runs
// (DefaultDebounce); d <= 0 keeps it.
func WithDebounce(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.debounce = d
		}
	}
}

// WithLogger sets where watch problems are reported (slog.Default).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// WithPollTimer sets the timer the poll interval is measured with
// (time.After), so tests with a fake clock can drive the polls.
func WithPollTimer(after func(time.Duration) <-chan time.Time) Option {
	return func(o *options) {
		if after != nil {
			o.after = after
		}
	}
}

// WithoutFirstCheck skips the check when the watches are in place, for a
// caller that has just loaded and applies files only on a later change.
func WithoutFirstCheck() Option {
	return func(o *options) { o.noFirst = true }
}

// DirsOf returns the directories of paths, each once, in order. Watching
// a file's directory rather than the file sees atomic renames and
// Kubernetes' ..data symlink swaps, which replace the file.
func DirsOf(paths ...string) []string {
	var dirs []string
	for _, p := range paths {
		if d := filepath.Dir(p); !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// Run calls check once when the watches are in place (changes made before
// them have no event; see WithoutFirstCheck), after filesystem events in dirs settle, and every
// poll interval, until ctx ends. A directory that cannot be watched is
// polled; the failure is logged.
func Run(ctx context.Context, dirs []string, check func(), opts ...Option) {
	o := options{poll: DefaultPoll, debounce: DefaultDebounce, log: slog.Default(), after: time.After}
	for _, opt := range opts {
		opt(&o)
	}
	var events <-chan fsnotify.Event
	var errs <-chan error
	if w, err := fsnotify.NewWatcher(); err != nil {
		o.log.Warn("file notifications unavailable, polling only", "err", err, "poll_interval", o.poll)
	} else {
		defer w.Close()
		for _, d := range dirs {
			if err := w.Add(d); err != nil {
				o.log.Warn("cannot watch directory, polling it", "dir", d, "err", err, "poll_interval", o.poll)
			}
		}
		events, errs = w.Events, w.Errors
	}
	if !o.noFirst {
		check()
	}
	settle := time.NewTimer(o.debounce)
	settle.Stop()
	defer settle.Stop()
	next := o.after(o.poll)
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-events:
			if !ok {
				events = nil
				continue
			}
			settle.Reset(o.debounce)
		case err, ok := <-errs:
			if !ok {
				errs = nil
				continue
			}
			o.log.Warn("file watch error; polling continues", "dirs", dirs, "err", err)
		case <-settle.C:
			check()
		case <-next:
			next = o.after(o.poll)
			check()
		}
	}
}
