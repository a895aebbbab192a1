package memtrim

import (
	"bufio"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// A /proc/PID/smaps excerpt: the executable (fe:00, inode 42) mapped as
// text, read-only data, writable data and once more read-only with a copied
// page; another file; anonymous memory; a shared mapping of the executable.
const smaps = `00400000-00e35000 r-xp 00000000 fe:00 42                                 /usr/local/bin/meshproxy
Size:              10452 kB
Rss:                8980 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
00e35000-019ae000 r--p 00a35000 fe:00 42                                 /usr/local/bin/meshproxy
Size:              11748 kB
Rss:                8484 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
019ae000-01a49000 rw-p 015ae000 fe:00 42                                 /usr/local/bin/meshproxy
Rss:                 492 kB
Anonymous:           132 kB
01a49000-01a4b000 r--p 01649000 fe:00 42                                 /usr/local/bin/meshproxy
Rss:                   8 kB
Anonymous:             4 kB
01a4b000-01a4c000 r--s 01649000 fe:00 42                                 /usr/local/bin/meshproxy
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000010000 r--p 00000000 fe:00 43                         /usr/lib/other.so
Rss:                  64 kB
Anonymous:             0 kB
7f0000010000-7f0000020000 r--p 00000000 fe:01 42                         /mnt/samenumber
Rss:                  64 kB
Anonymous:             0 kB
7f1fab320000-7f1fab500000 rw-p 00000000 00:00 0 
Rss:                 368 kB
Anonymous:           368 kB
`

func TestReleasableKeepsOnlyReadOnlyPagesOfTheExecutable(t *testing.T) {
	got, err := releasable(strings.NewReader(smaps), 0x400000+0x1234) // code in the text mapping
	if err != nil {
		t.Fatal(err)
	}
	want := []mapping{
		{start: 0x400000, end: 0xe35000, perms: "r-xp", dev: "fe:00", inode: 42, rss: 8980 << 10},
		{start: 0xe35000, end: 0x19ae000, perms: "r--p", dev: "fe:00", inode: 42, rss: 8484 << 10},
	}
	if len(got) != len(want) {
		t.Fatalf("releasable = %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("mapping %d = %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestReleasableRefusesWhatItCannotPlace(t *testing.T) {
	if _, err := releasable(strings.NewReader("zz-00e35000 r-xp 00000000 fe:00 42 /x\n"), 0x400000); err == nil {
		t.Error("a mapping line with a bad address parsed")
	}
	// The code address in anonymous memory, or in no mapping: nothing to
	// call the executable, nothing released.
	for _, code := range []uintptr{0x7f1fab320000, 0x10} {
		if got, err := releasable(strings.NewReader(smaps), code); err == nil {
			t.Errorf("code at %#x: released %+v", code, got)
		}
	}
}

// TestTrimReleasesTheExecutablesPagesAndKeepsRunning trims this test binary:
// its text is no longer resident right after, and the code still runs.
func TestTrimReleasesTheExecutablesPagesAndKeepsRunning(t *testing.T) {
	before := exeTextRSS(t)
	res, err := Trim()
	if err != nil {
		t.Fatal(err)
	}
	after := exeTextRSS(t)
	if res.Mappings < 2 || res.Bytes == 0 {
		t.Errorf("Trim released %d mappings of %d bytes, want the text and read-only data", res.Mappings, res.Bytes)
	}
	if after >= before {
		t.Errorf("resident text of the executable %d KiB before Trim, %d KiB after: nothing released", before, after)
	}
	// The released code runs again (faulted back in from the page cache).
	if got := strconv.Itoa(12345) + strings.Repeat("x", 2); got != "12345xx" {
		t.Errorf("after Trim: %q", got)
	}
	if _, err := Trim(); err != nil {
		t.Fatalf("second Trim: %v", err)
	}
}

// exeTextRSS is the resident KiB of the executable's text mapping (the one
// holding Trim's code).
func exeTextRSS(t *testing.T) uint64 {
	t.Helper()
	code := reflect.ValueOf(Trim).Pointer()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	inText := false
	for s.Scan() {
		fs := strings.Fields(s.Text())
		if isHeader(s.Bytes()) {
			m, err := parseHeader(s.Text())
			if err != nil {
				t.Fatal(err)
			}
			inText = m.start <= code && code < m.end
			continue
		}
		if inText && len(fs) >= 2 && fs[0] == "Rss:" {
			v, err := strconv.ParseUint(fs[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatal("no text mapping of the executable in /proc/self/smaps")
	return 0
}

// TestIdleReleasesAfterABurstOnceQuiet: a release comes at the first quiet
// interval after enough work or after a collection, once, never while busy.
func TestIdleReleasesAfterABurstOnceQuiet(t *testing.T) {
	d := Idle{Quiet: 64 << 10, Busy: 256 << 10}
	steps := []struct {
		allocs uint64
		gc     uint32
		want   bool
	}{
		{10 << 20, 1, false},         // first sample: a baseline
		{10<<20 + 1<<10, 1, false},   // quiet, nothing happened since
		{14 << 20, 1, false},         // a burst: busy
		{18 << 20, 2, false},         // still busy (a collection meanwhile)
		{18<<20 + 2<<10, 2, true},    // quiet after 8 MB of work: release
		{18<<20 + 4<<10, 3, false},   // the release's own collection: quiet, nothing to do
		{18<<20 + 128<<10, 3, false}, // a little work, under Busy
		{18<<20 + 130<<10, 3, false}, // quiet, not worth a release
		{18<<20 + 131<<10, 4, true},  // quiet, but the runtime's periodic collection ran: release
		{18<<20 + 132<<10, 5, false}, // that release's collection
		{21 << 20, 5, false},         // another burst
		{21<<20 + 10<<10, 5, true},   // quiet: release
	}
	for i, s := range steps {
		got := d.Observe(s.allocs, s.gc)
		if got != s.want {
			t.Fatalf("step %d (allocs %d, gc %d): release = %v, want %v", i, s.allocs, s.gc, got, s.want)
		}
		if got {
			// The release's collection, counted by the next sample.
			d.Released(s.allocs, s.gc+1)
		}
	}
}

func TestAllocsCountsSmallObjectsAndCollections(t *testing.T) {
	before, gc := Allocs()
	var keep [][]byte
	for range 1000 {
		keep = append(keep, make([]byte, 64)) // small objects, in per-P caches
	}
	runtime.KeepAlive(keep)
	after, _ := Allocs()
	if after < before+64*1000 {
		t.Errorf("Allocs %d → %d after 1000 allocations of 64 bytes", before, after)
	}
	runtime.GC()
	if _, gc2 := Allocs(); gc2 <= gc {
		t.Errorf("collections %d → %d after runtime.GC", gc, gc2)
	}
}
