package authn

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/metrics"
)

// maxTokenFileSize bounds the tokens file.
const maxTokenFileSize = fileread.MaxTokensFile

// Tokens authenticates static bearer tokens listed in a file, one
// "TOKEN SPIFFE-ID" a line ('#' starts a comment; blank lines are fine).
// The file is re-read when it changes; a bad version is logged and the last
// good set stays in use. Tokens are kept only as SHA-256 hashes and compared
// in constant time.
type Tokens struct {
	path string
	log  *slog.Logger

	mu    sync.Mutex // serializes stat+reload
	stamp fileStamp  // version last loaded, good or bad
	cur   atomic.Pointer[[]tokenEntry]
}

type tokenEntry struct {
	hash [sha256.Size]byte
	id   spiffeid.ID
}

// NewTokens loads the tokens file at path; an unreadable or malformed file
// is an error naming the file and line.
func NewTokens(path string, opts ...Option) (*Tokens, error) {
	o := newOptions(opts)
	t := &Tokens{path: path, log: o.log}
	stamp, err := statFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	entries, err := parseTokens(path)
	if err != nil {
		return nil, err
	}
	t.stamp = stamp
	t.cur.Store(&entries)
	if len(entries) == 0 {
		t.log.Warn("tokens file lists no tokens", "file", path)
	}
	return t, nil
}

// Name implements Authenticator.
func (t *Tokens) Name() string { return "token" }

// Authenticate implements Authenticator.
func (t *Tokens) Authenticate(_ context.Context, c Caller) (spiffeid.ID, error) {
	if c.Token == "" {
		return spiffeid.ID{}, fmt.Errorf("%w: no bearer token", ErrNoCredentials)
	}
	t.reloadIfChanged()
	sum := sha256.Sum256([]byte(c.Token))
	match := -1
	entries := *t.cur.Load()
	for i := range entries { // every entry is compared: no early exit
		if subtle.ConstantTimeCompare(sum[:], entries[i].hash[:]) == 1 {
			match = i
		}
	}
	if match < 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: unknown token", ErrUnauthenticated)
	}
	return entries[match].id, nil
}

// Len is the number of tokens currently loaded.
func (t *Tokens) Len() int {
	t.reloadIfChanged()
	return len(*t.cur.Load())
}

func (t *Tokens) reloadIfChanged() {
	t.mu.Lock()
	defer t.mu.Unlock()
	stamp, err := statFile(t.path)
	if err != nil {
		if t.stamp != (fileStamp{}) {
			t.log.Error("tokens file unreadable; keeping the last good tokens", "file", t.path, "err", err)
			metrics.ConfigReloads.WithLabelValues("tokens", "failure").Inc()
			t.stamp = fileStamp{}
		}
		return
	}
	if stamp == t.stamp {
		return
	}
	t.stamp = stamp
	entries, err := parseTokens(t.path)
	if err != nil {
		t.log.Error("tokens file reload failed; keeping the last good tokens", "err", err)
		metrics.ConfigReloads.WithLabelValues("tokens", "failure").Inc()
		return
	}
	t.cur.Store(&entries)
	metrics.ConfigReloads.WithLabelValues("tokens", "success").Inc()
	t.log.Info("tokens file reloaded", "file", t.path, "tokens", len(entries))
}

func parseTokens(path string) ([]tokenEntry, error) {
	data, err := fileread.Read(path, maxTokenFileSize)
	if err != nil {
		return nil, fmt.Errorf("tokens file: %w", err)
	}
	var (
		entries []tokenEntry
		seen    = map[[sha256.Size]byte]int{}
		errs    []error
		lineNo  int
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxTokenFileSize)
	for sc.Scan() {
		lineNo++
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		if len(fields) > 2 && strings.HasPrefix(fields[2], "#") {
			fields = fields[:2]
		}
		if len(fields) != 2 {
			errs = append(errs, fmt.Errorf("%s:%d: want \"TOKEN SPIFFE-ID\", got %d fields", path, lineNo, len(fields)))
			continue
		}
		id, err := spiffeid.FromString(fields[1])
		if err != nil {
			// Quote the field only if it looks like a SPIFFE ID: with the
			// columns swapped it is a token, and this error is logged.
			if strings.HasPrefix(strings.ToLower(fields[1]), "spiffe://") {
				errs = append(errs, fmt.Errorf("%s:%d: SPIFFE ID %q: %w", path, lineNo, fields[1], err))
			} else {
				errs = append(errs, fmt.Errorf("%s:%d: second field is not a SPIFFE ID (want \"TOKEN SPIFFE-ID\"; value not shown): %w", path, lineNo, err))
			}
			continue
		}
		sum := sha256.Sum256([]byte(fields[0]))
		if prev, dup := seen[sum]; dup {
			errs = append(errs, fmt.Errorf("%s:%d: token already listed on line %d", path, lineNo, prev))
			continue
		}
		seen[sum] = lineNo
		entries = append(entries, tokenEntry{hash: sum, id: id})
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("%s:%d: %w", path, lineNo+1, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return entries, nil
}
