package ratelog

import (
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

func TestFloodWritesTheFirstLinesThenOneSummaryPerKey(t *testing.T) {
	var out e2eutil.Buffer
	l := New(slog.New(slog.NewTextHandler(&out, nil)), 5)
	var mu sync.Mutex
	now := time.Unix(1_700_000_000, 0)
	l.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }

	for range 10_000 {
		l.Warn("mtls_required", "connection refused", "reason", "mtls_required")
	}
	l.Warn("over_limit", "connection refused", "reason", "over_limit")
	l.flush("mtls_required") // what the timer does a second later
	got := out.String()
	if n := strings.Count(got, "reason=mtls_required"); n != 5 {
		t.Fatalf("%d lines for a flooded key, want 5:\n%s", n, got)
	}
	if !strings.Contains(got, "reason=over_limit") {
		t.Fatalf("another key was suppressed by the flood:\n%s", got)
	}
	if !strings.Contains(got, `msg="log lines suppressed" key=mtls_required of="connection refused" suppressed=9995`) {
		t.Fatalf("no summary of the 9995 suppressed lines:\n%s", got)
	}
	// The next second writes again.
	mu.Lock()
	now = now.Add(time.Second)
	mu.Unlock()
	l.Warn("mtls_required", "connection refused", "reason", "mtls_required")
	if n := strings.Count(out.String(), "reason=mtls_required"); n != 6 {
		t.Fatalf("a new second wrote %d lines in all, want 6", n)
	}
}
