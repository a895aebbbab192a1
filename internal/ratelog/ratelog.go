// Package ratelog keeps refusal logs readable under a flood: for each key
// (a refusal reason, a bounded set), the first lines of every second are
// written and the rest only counted, then summarised in one "suppressed"
// line. Counters stay exact; only the log lines are sampled.
package ratelog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// DefaultPerSecond is how many lines a key may write per second.
const DefaultPerSecond = 10

// Limiter rate-limits log lines per key. The zero value is not usable; use
// New. It is safe for concurrent use.
type Limiter struct {
	log       *slog.Logger
	perSecond int
	now       func() time.Time

	mu   sync.Mutex
	keys map[string]*window
}

type window struct {
	start      time.Time
	n          int    // lines in this window, written or not
	suppressed int    // lines not written since the last summary
	msg        string // the message suppressed
	level      slog.Level
}

// New returns a Limiter writing to log at most perSecond lines a second per
// key (DefaultPerSecond when zero or less).
func New(log *slog.Logger, perSecond int) *Limiter {
	if perSecond <= 0 {
		perSecond = DefaultPerSecond
	}
	return &Limiter{log: log, perSecond: perSecond, now: time.Now, keys: map[string]*window{}}
}

// Warn logs msg at WARN, unless key has used its lines for this second.
func (l *Limiter) Warn(key, msg string, attrs ...any) { l.Log(slog.LevelWarn, key, msg, attrs...) }

// Log logs msg at level, unless key has used its lines for this second;
// then it counts the line, and a second after the first one suppressed
// writes "log lines suppressed" with the key, the message and the count.
func (l *Limiter) Log(level slog.Level, key, msg string, attrs ...any) {
	now := l.now()
	l.mu.Lock()
	w := l.keys[key]
	if w == nil {
		w = &window{}
		l.keys[key] = w
	}
	if now.Sub(w.start) >= time.Second {
		w.start, w.n = now, 0
	}
	w.n++
	if w.n <= l.perSecond {
		l.mu.Unlock()
		l.log.Log(context.Background(), level, msg, attrs...)
		return
	}
	w.suppressed++
	w.msg, w.level = msg, level
	if w.suppressed == 1 {
		time.AfterFunc(time.Second-now.Sub(w.start), func() { l.flush(key) })
	}
	l.mu.Unlock()
}

// flush writes the summary of key's suppressed lines.
func (l *Limiter) flush(key string) {
	l.mu.Lock()
	w := l.keys[key]
	k, msg, level := w.suppressed, w.msg, w.level
	w.suppressed = 0
	l.mu.Unlock()
	if k > 0 {
		l.log.Log(context.Background(), level, "log lines suppressed", "key", key, "of", msg, "suppressed", k,
			"limit_per_second", l.perSecond)
	}
}
