// Package memtrim gives back, once a long-running process has started (and
// again when it goes idle, see Idle), the memory its start-up (or its last
// burst of work) used and its steady state does not:
//
//   - the heap garbage of package initialisation, flag parsing and start-up
//     (a garbage collection that returns the freed pages to the kernel);
//   - the page-table entries of the executable's read-only pages that
//     start-up touched: one binary serves every role (CA, sidecar, gateway,
//     capture), and Go runs the init code of every package it links, which
//     together with the kernel's fault-around maps nearly all of the
//     binary's text and tables into every process.
//
// The executable's pages stay in the page cache, shared by every process of
// the same binary; the process only stops mapping them, so they count in its
// RSS again when it runs that code again (a minor fault, no I/O while the
// page is cached) and the kernel may reclaim them meanwhile. Only private,
// read-only mappings of the executable without any copied-on-write page are
// released, so nothing but the file's own content is ever dropped.
package memtrim

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Result says what Trim gave back.
type Result struct {
	// Mappings is how many read-only mappings of the executable were
	// released; Bytes their resident size before the release.
	Mappings int
	Bytes    uint64
}

// Trim runs a garbage collection that returns the freed heap to the
// operating system, then releases the process's resident pages of the
// executable's read-only mappings (see Package memtrim). It is meant for
// after start-up and for when the process has gone idle (Idle); the process
// keeps working as before, the released pages fault back in (from the page
// cache) when it runs that code again.
func Trim() (Result, error) {
	debug.FreeOSMemory()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return Result{}, fmt.Errorf("trim: %w", err)
	}
	// The executable is the file that holds this very code. Not a stat of
	// /proc/self/exe: on overlayfs (a container's root) the mappings name
	// the underlying file's device and inode, not the overlay's.
	maps, err := releasable(f, reflect.ValueOf(Trim).Pointer())
	f.Close()
	if err != nil {
		return Result{}, fmt.Errorf("trim: read /proc/self/smaps: %w", err)
	}
	var res Result
	for _, m := range maps {
		// Not unix.Madvise: that takes a []byte, and the range is no Go memory.
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); errno != 0 {
			return res, fmt.Errorf("trim: madvise %#x-%#x: %w", m.start, m.end, errno)
		}
		res.Mappings++
		res.Bytes += m.rss
	}
	return res, nil
}

// mapping is one mapping of /proc/PID/smaps.
type mapping struct {
	start, end uintptr
	perms      string // "r-xp"
	dev        string // "fe:00"
	inode      uint64
	rss        uint64 // resident bytes
	anon       uint64 // anonymous (copied-on-write) bytes
}

// releasable returns the mappings of smaps whose pages can be dropped
// without losing anything: mappings of the file that holds the code at
// address code (the executable), private, not writable, and holding no
// anonymous (copied-on-write) page, which would otherwise fall back to the
// file's content.
func releasable(smaps io.Reader, code uintptr) ([]mapping, error) {
	var all []mapping
	s := bufio.NewScanner(smaps)
	for s.Scan() {
		line := s.Bytes()
		if name, val, ok := field(line); ok && len(all) > 0 {
			switch name {
			case "Rss":
				all[len(all)-1].rss = val
			case "Anonymous":
				all[len(all)-1].anon = val
			}
			continue
		}
		if !isHeader(line) {
			continue
		}
		m, err := parseHeader(string(line))
		if err != nil {
			return nil, err
		}
		all = append(all, m)
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	i := slices.IndexFunc(all, func(m mapping) bool { return m.start <= code && code < m.end })
	if i < 0 || all[i].inode == 0 {
		return nil, fmt.Errorf("no file mapping holds the code at %#x", code)
	}
	exe := all[i]
	var out []mapping
	for _, m := range all {
		if m.dev == exe.dev && m.inode == exe.inode && m.perms[1] == '-' && m.perms[3] == 'p' && m.anon == 0 {
			out = append(out, m)
		}
	}
	return out, nil
}

// isHeader reports whether line starts a mapping ("start-end perms ...")
// rather than being one of its "Name: value" fields.
func isHeader(line []byte) bool {
	sp := bytes.IndexByte(line, ' ')
	return sp > 0 && bytes.IndexByte(line[:sp], '-') > 0 && !bytes.HasSuffix(line[:sp], []byte(":"))
}

// field parses "Name:   123 kB" into its name and value in bytes.
func field(line []byte) (string, uint64, bool) {
	name, rest, ok := bytes.Cut(line, []byte(":"))
	if !ok || bytes.ContainsAny(name, " -") {
		return "", 0, false
	}
	num, unit, _ := strings.Cut(strings.TrimSpace(string(rest)), " ")
	v, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return "", 0, false
	}
	if unit == "kB" {
		v *= 1024
	}
	return string(name), v, true
}

// parseHeader parses "start-end perms offset major:minor inode [path]".
func parseHeader(line string) (mapping, error) {
	f := strings.Fields(line)
	if len(f) < 5 || len(f[1]) != 4 {
		return mapping{}, fmt.Errorf("bad mapping line %q", line)
	}
	lo, hi, _ := strings.Cut(f[0], "-")
	start, err1 := strconv.ParseUint(lo, 16, 64)
	end, err2 := strconv.ParseUint(hi, 16, 64)
	inode, err3 := strconv.ParseUint(f[4], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return mapping{}, fmt.Errorf("bad mapping line %q: %w", line, err)
	}
	if end <= start {
		return mapping{}, fmt.Errorf("bad mapping line %q: empty range", line)
	}
	return mapping{start: uintptr(start), end: uintptr(end), perms: f[1], dev: f[3], inode: inode}, nil
}

// Idle decides when a process that has gone quiet should release again
// (Trim) what work left since its last release: the garbage below the
// heap's collection threshold, and the pages of the executable that the work
// mapped — which includes a garbage collection's own: the runtime collects
// at least every two minutes, and scanning goroutine stacks maps the
// binary's frame tables back in. It is fed, at a fixed interval, the
// process's cumulative allocation (Allocs) and completed collections: an
// interval is quiet if it allocated less than Quiet bytes; a quiet interval
// releases if more than Busy bytes were allocated, or a collection ran,
// since the last release.
type Idle struct {
	Quiet, Busy uint64

	last, released uint64
	releasedGC     uint32
	started        bool
}

// Observe takes the cumulative allocation and collection counts at the end
// of an interval and reports whether to release now. After a release the
// caller passes the counts again to Released.
func (d *Idle) Observe(allocs uint64, numGC uint32) bool {
	if !d.started {
		d.Released(allocs, numGC)
		return false
	}
	quiet := allocs-d.last < d.Quiet
	d.last = allocs
	return quiet && (allocs-d.released > d.Busy || numGC != d.releasedGC)
}

// Released records the counts right after a release (whose own collection
// is then not a reason for the next).
func (d *Idle) Released(allocs uint64, numGC uint32) {
	d.started, d.released, d.last, d.releasedGC = true, allocs, allocs, numGC
}

// Allocs returns the process's cumulative heap allocation in bytes and its
// completed garbage collections (MemStats.TotalAlloc, NumGC). Not
// runtime/metrics' /gc/heap/allocs:bytes: that counts small objects only
// when their span is retired, so a burst of connections can stay invisible
// for minutes; ReadMemStats flushes the per-P caches first (a stop of the
// world of microseconds).
func Allocs() (uint64, uint32) {
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.TotalAlloc, m.NumGC
}
