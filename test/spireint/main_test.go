package spireint

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// spireVersion is the SPIRE release pinned in test/spire/go.mod.
const spireVersion = "v1.13.3"

// spireModuleDir is test/spire, relative to this package's directory (the
// working directory of `go test`).
const spireModuleDir = "../spire"

// binDirEnv names a directory with prebuilt spire-server and spire-agent.
const binDirEnv = "MESHPROXY_SPIRE_BIN"

// spireBin holds the paths of the SPIRE binaries, set once by TestMain.
var spireBin struct{ server, agent string }

func TestMain(m *testing.M) {
	flag.Parse()
	if !testing.Short() {
		start := time.Now()
		dir, built, err := spireBinaries()
		if err != nil {
			fmt.Fprintf(os.Stderr, "spireint: %v\n", err)
			os.Exit(1)
		}
		if built {
			fmt.Fprintf(os.Stderr, "spireint: built SPIRE %s into %s in %s\n", spireVersion, dir, time.Since(start).Round(time.Second))
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
// spire-agent, building them if needed, and whether it built them.
func spireBinaries() (dir string, built bool, err error) {
	if dir := os.Getenv(binDirEnv); dir != "" {
		if err := haveBinaries(dir); err != nil {
			return "", false, fmt.Errorf("%s=%s: %w", binDirEnv, dir, err)
		}
		return dir, false, nil
	}
	// The directory is keyed by the module's go.mod and go.sum, so a
	// changed pin never reuses stale binaries.
	h := sha256.New()
	for _, f := range []string{"go.mod", "go.sum"} {
		data, err := os.ReadFile(filepath.Join(spireModuleDir, f))
		if err != nil {
			return "", false, fmt.Errorf("read SPIRE tools module: %w", err)
		}
		h.Write(data)
	}
	dir = filepath.Join(os.TempDir(), "meshproxy-spire-"+spireVersion+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", false, err
	}
	// Concurrent test processes (several packages, several engineers)
	// build once: the first holds the lock, the others then reuse.
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", false, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", false, fmt.Errorf("lock %s: %w", dir, err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // closing the file releases it too
	if haveBinaries(dir) == nil {
		return dir, false, nil
	}
	if err := buildSPIRE(dir); err != nil {
		return "", false, err
	}
	return dir, true, haveBinaries(dir)
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

// buildSPIRE builds both binaries in one go command (they share most of
// their packages) into a scratch directory, then moves them into dir so a
// killed build never leaves half a binary behind.
func buildSPIRE(dir string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("build SPIRE: the go command is not on PATH: %w", err)
	}
	modDir, err := filepath.Abs(spireModuleDir)
	if err != nil {
		return err
	}
	scratch, err := os.MkdirTemp(dir, "build-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)
	fmt.Fprintf(os.Stderr, "spireint: building SPIRE %s from %s (the first build takes several minutes)\n", spireVersion, modDir)
	cmd := exec.Command(goBin, "build", "-C", modDir, "-o", scratch+string(filepath.Separator),
		"github.com/spiffe/spire/cmd/spire-server", "github.com/spiffe/spire/cmd/spire-agent")
	// The sqlite datastore needs cgo; GOFLAGS from the caller (such as
	// -race) must not leak into the SPIRE build.
	cmd.Env = append(filteredEnv("GOFLAGS=", "CGO_ENABLED="), "CGO_ENABLED=1", "GOFLAGS=-mod=readonly -buildvcs=false")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("build SPIRE %s (%s): %w\n%s", spireVersion, strings.Join(cmd.Args, " "), err, out.String())
	}
	for _, name := range []string{"spire-server", "spire-agent"} {
		if err := os.Rename(filepath.Join(scratch, name), filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("install %s: %w", name, err)
		}
	}
	return nil
}

// filteredEnv is os.Environ without variables starting with any prefix.
func filteredEnv(prefixes ...string) []string {
	var env []string
next:
	for _, kv := range os.Environ() {
		for _, p := range prefixes {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		env = append(env, kv)
	}
	return env
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
