package policy

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// quiet keeps expected error logs out of test output.
var quiet = WithLogger(slog.New(slog.DiscardHandler))

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// loadYAML loads content as the only file policy.yaml of a fresh directory,
// with --strict-config (any rejected document is an error) and a resolver
// that knows no name (no DNS query leaves the machine) unless opts say
// otherwise.
func loadYAML(t *testing.T, wl Workload, content string, opts ...Option) (*Store, error) {
	t.Helper()
	dir := t.TempDir()
	writeFile(t, dir, "policy.yaml", content)
	return NewStore(dir, wl, append([]Option{quiet, WithStrictConfig(true), WithResolver(newFakeDNS(nil).resolve)}, opts...)...)
}

func mustLoad(t *testing.T, wl Workload, content string, opts ...Option) *Snapshot {
	t.Helper()
	st, err := loadYAML(t, wl, content, opts...)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	return st.Current()
}

func id(t *testing.T, s string) spiffeid.ID {
	t.Helper()
	if s == "" {
		return spiffeid.ID{}
	}
	v, err := spiffeid.FromString(s)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// docs joins YAML documents into one stream.
func docs(d ...string) string { return strings.Join(d, "\n---\n") }
