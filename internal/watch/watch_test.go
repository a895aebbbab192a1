package watch

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// started runs Run in the background with checks reported on the returned
// channel; the first check (when the watches are in place) is consumed.
func started(t *testing.T, dirs []string, opts ...Option) <-chan struct{} {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	checks := make(chan struct{}, 16)
	done := make(chan struct{})
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)
	go func() {
		defer close(done)
		Run(ctx, dirs, func() { checks <- struct{}{} }, opts...)
	}()
	t.Cleanup(func() {
		cancel()
		<-done // Run returns when its context ends
	})
	waitCheck(t, checks, "the initial check")
	return checks
}

// waitCheck fails the test if check is not called; the limit only guards
// against a hang, it asserts no speed.
func waitCheck(t *testing.T, checks <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-checks:
	case <-time.After(30 * time.Second):
		t.Fatalf("no check after %s", what)
	}
}

func TestRunChecksAfterAFileChanges(t *testing.T) {
	dir := t.TempDir()
	checks := started(t, []string{dir}, WithPoll(time.Hour))
	if err := os.WriteFile(filepath.Join(dir, "tls.crt"), []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	waitCheck(t, checks, "a write")
}

func TestRunChecksAfterAKubernetesDataSwap(t *testing.T) {
	dir := t.TempDir()
	for _, ts := range []string{"..1", "..2"} {
		if err := os.Mkdir(filepath.Join(dir, ts), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, ts, "tls.crt"), []byte(ts), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("..1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/tls.crt", filepath.Join(dir, "tls.crt")); err != nil {
		t.Fatal(err)
	}
	checks := started(t, DirsOf(filepath.Join(dir, "tls.crt")), WithPoll(time.Hour))
	// The kubelet's swap: a new symlink renamed over ..data.
	if err := os.Symlink("..2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	waitCheck(t, checks, "a ..data swap")
}

func TestRunPollsWhereADirectoryCannotBeWatched(t *testing.T) {
	tick := make(chan time.Time)
	missing := filepath.Join(t.TempDir(), "not-yet")
	checks := started(t, []string{missing}, WithPollTimer(func(time.Duration) <-chan time.Time { return tick }))
	for i := range 2 {
		tick <- time.Time{}
		waitCheck(t, checks, "poll "+string(rune('1'+i)))
	}
}

func TestDirsOfListsEachDirectoryOnce(t *testing.T) {
	got := DirsOf("/a/tls.crt", "/a/tls.key", "/b/ca.crt")
	if want := []string{"/a", "/b"}; !slices.Equal(got, want) {
		t.Fatalf("DirsOf = %v, want %v", got, want)
	}
}
