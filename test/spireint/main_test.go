package spireint

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/meshproxy/meshproxy/internal/testtools"
)

// binDirEnv names a directory with prebuilt spire-server and spire-agent
// (make test sets it to what `make tools` built).
const binDirEnv = "MESHPROXY_SPIRE_BIN"

// spireBin holds the paths of the SPIRE binaries, set once by TestMain.
var spireBin struct{ server, agent string }

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Short() {
		dir, err := spireBinaries()
		if err != nil {
			fmt.Fprintf(os.Stderr, "spireint: %v\n", err)
			os.Exit(1)
		}
		spireBin.server = filepath.Join(dir, "spire-server")
		spireBin.agent = filepath.Join(dir, "spire-agent")
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "spireint: leaked goroutines: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// skipShort skips SPIRE tests under -short, where TestMain builds nothing.
func skipShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("real SPIRE tests need the SPIRE build; skipped with -short")
	}
}

// spireBinaries returns the directory holding spire-server and
// spire-agent: $MESHPROXY_SPIRE_BIN, or the test tools' cache, built there
// by scripts/test-tools.sh when missing or stale.
func spireBinaries() (string, error) {
	if dir := os.Getenv(binDirEnv); dir != "" {
		if err := haveBinaries(dir); err != nil {
			return "", fmt.Errorf("%s=%s: %w", binDirEnv, dir, err)
		}
		return dir, nil
	}
	dir, err := testtools.Dir()
	if err != nil {
		return "", err
	}
	return dir, haveBinaries(dir)
}

func haveBinaries(dir string) error {
	var errs []error
	for _, name := range []string{"spire-server", "spire-agent"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		switch {
		case err != nil:
			errs = append(errs, err)
		case fi.Mode()&0o111 == 0:
			errs = append(errs, fmt.Errorf("%s is not executable", fi.Name()))
		}
	}
	return errors.Join(errs...)
}

// tail returns the last n lines of the file at path, for failure messages.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, 8<<20))
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
