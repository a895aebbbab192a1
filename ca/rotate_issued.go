package ca

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// issuedBucket is the granularity of the expiry counts: counts are kept per
// minute of expiry, so the record stays small however many certificates are
// issued (a day of 24h certificates is at most 1440 entries per root).
const issuedBucket = time.Minute

// maxIssuedRecordSize bounds the record file the CA and `ca status` read.
const maxIssuedRecordSize = 16 << 20

// issuedRecord is the content of IssuedRecordFile: per root (by
// fingerprint), when the certificates signed under it expire.
type issuedRecord struct {
	Roots map[string]*rootRecord `json:"roots"`
}

// rootRecord counts the certificates signed under one root.
type rootRecord struct {
	Subject string `json:"subject"`
	// Since is when this record began; certificates signed under the root
	// before it (by another CA process) are not counted.
	Since        time.Time `json:"recording_since"`
	Issued       uint64    `json:"issued_total"`
	LastNotAfter time.Time `json:"last_not_after,omitzero"` // latest expiry of a certificate signed under the root
	// Live counts unexpired certificates by expiry, rounded up to the
	// minute, in ascending order.
	Live []expiryCount `json:"live,omitempty"`
}

type expiryCount struct {
	Until time.Time `json:"until"`
	Count uint64    `json:"count"`
}

// add counts one certificate expiring at notAfter and drops expired counts.
func (r *rootRecord) add(notAfter, now time.Time) {
	r.Issued++
	if notAfter.After(r.LastNotAfter) {
		r.LastNotAfter = notAfter
	}
	r.prune(now)
	until := notAfter.Truncate(issuedBucket)
	if until.Before(notAfter) {
		until = until.Add(issuedBucket)
	}
	i, found := slices.BinarySearchFunc(r.Live, until, func(e expiryCount, t time.Time) int { return e.Until.Compare(t) })
	if found {
		r.Live[i].Count++
		return
	}
	r.Live = slices.Insert(r.Live, i, expiryCount{Until: until, Count: 1})
}

func (r *rootRecord) prune(now time.Time) {
	i := 0
	for i < len(r.Live) && !r.Live[i].Until.After(now) {
		i++
	}
	r.Live = r.Live[i:]
}

// live returns how many certificates signed under the root may still be
// valid at now (counted to the minute, so it may include some that expired
// within the last minute) and when the last of them expires. Once that time
// has passed the count is 0.
func (r *rootRecord) live(now time.Time) (uint64, time.Time) {
	if !r.LastNotAfter.After(now) {
		return 0, time.Time{}
	}
	var n uint64
	for _, e := range r.Live {
		if e.Until.After(now) {
			n += e.Count
		}
	}
	return max(n, 1), r.LastNotAfter
}

// readIssuedRecord reads dir's IssuedRecordFile; a missing file is an empty
// record.
func readIssuedRecord(dir string) (*issuedRecord, error) {
	path := filepath.Join(dir, IssuedRecordFile)
	rec := &issuedRecord{Roots: map[string]*rootRecord{}}
	data, err := fileread.Read(path, maxIssuedRecordSize)
	if errors.Is(err, fs.ErrNotExist) {
		return rec, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read issuance record: %w", err)
	}
	if err := json.Unmarshal(data, rec); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrRotationState, path, err)
	}
	if rec.Roots == nil {
		rec.Roots = map[string]*rootRecord{}
	}
	return rec, nil
}

// issuedLog is the CA server's side of IssuedRecordFile: it counts every
// certificate the server issues under the root it chains to and writes the
// record shortly after each change. Only one CA process should serve a
// directory; a second would overwrite the first one's record.
type issuedLog struct {
	path string
	log  *slog.Logger
	now  func() time.Time

	mu      sync.Mutex
	rec     *issuedRecord
	dirty   bool
	lastErr string
	wake    chan struct{}
}

// flushDelay gathers a burst of issuances into one write.
const flushDelay = 200 * time.Millisecond

// openIssuedLog loads dir's record. A record that cannot be read is moved
// aside (and the move logged) so counting starts afresh rather than not at
// all.
func openIssuedLog(dir string, log *slog.Logger, now func() time.Time) *issuedLog {
	l := &issuedLog{path: filepath.Join(dir, IssuedRecordFile), log: log, now: now, wake: make(chan struct{}, 1)}
	rec, err := readIssuedRecord(dir)
	if err != nil {
		aside := l.path + ".unreadable"
		rerr := os.Rename(l.path, aside)
		log.Error("issuance record unreadable; starting a new one", "file", l.path, "err", err, "moved_to", aside, "move_error", errString(rerr))
		rec = &issuedRecord{Roots: map[string]*rootRecord{}}
	}
	l.rec = rec
	return l
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// track makes sure the root the server signs under has a record (so `ca
// status` can tell "nothing issued" from "not recorded"; other roots get one
// only when the server signs under them, as it cannot vouch for what others
// signed) and drops records of roots that left the bundle and have nothing
// live.
func (l *issuedLog) track(signing *x509.Certificate, bundle []*x509.Certificate) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if fp := Fingerprint(signing); l.rec.Roots[fp] == nil {
		l.rec.Roots[fp] = &rootRecord{Subject: signing.Subject.String(), Since: now}
		l.dirty = true
	}
	keep := map[string]bool{}
	for _, r := range bundle {
		keep[Fingerprint(r)] = true
	}
	for fp, r := range l.rec.Roots {
		if n, _ := r.live(now); !keep[fp] && n == 0 {
			delete(l.rec.Roots, fp)
			l.dirty = true
		}
	}
	l.signal()
}

// record counts a certificate expiring at notAfter signed under root.
func (l *issuedLog) record(root *x509.Certificate, notAfter time.Time) {
	now := l.now()
	fp := Fingerprint(root)
	l.mu.Lock()
	r, ok := l.rec.Roots[fp]
	if !ok {
		r = &rootRecord{Subject: root.Subject.String(), Since: now}
		l.rec.Roots[fp] = r
	}
	r.add(notAfter, now)
	l.dirty = true
	l.signal()
	l.mu.Unlock()
}

func (l *issuedLog) signal() {
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// run writes the record after changes until ctx ends, then once more.
func (l *issuedLog) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			l.flush()
			return
		case <-l.wake:
		}
		t := time.NewTimer(flushDelay)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
		l.flush()
	}
}

// flush writes the record if it changed. A failure is logged once per
// distinct error and retried at the next change.
func (l *issuedLog) flush() {
	l.mu.Lock()
	if !l.dirty {
		l.mu.Unlock()
		return
	}
	for _, r := range l.rec.Roots {
		r.prune(l.now())
	}
	data, err := json.MarshalIndent(l.rec, "", "  ")
	l.dirty = false
	l.mu.Unlock()
	if err == nil {
		err = replaceFiles(filepath.Dir(l.path), []fileData{{filepath.Base(l.path), append(data, '\n'), 0o644}})
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err != nil {
		l.dirty = true
		if msg := err.Error(); msg != l.lastErr {
			l.lastErr = msg
			l.log.Warn("cannot write the issuance record (read-only CA directory?); `ca rotate-root` cannot check retirement until it is written", "file", l.path, "err", err)
		}
		return
	}
	l.lastErr = ""
}
