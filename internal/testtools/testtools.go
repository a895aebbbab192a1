// Package testtools finds, building them when missing or stale, the real
// SPIRE server and agent and step-ca that meshproxy's tests run. One build
// for `make test` and a plain `go test` of one package: scripts/test-tools.sh
// (what `make tools` runs) builds them from the test/spire and test/stepca
// modules into CacheDir()/test-tools, and does nothing when they are up to
// date. It is for tests only.
package testtools

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// CacheDir is ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}, where the test
// tools are built, outside any checkout.
func CacheDir() string {
	if d := os.Getenv("MESHPROXY_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "meshproxy")
}

// Dir returns the directory holding spire-server, spire-agent and step-ca,
// after running scripts/test-tools.sh of the checkout holding the working
// directory (a package directory under `go test`). A build that took long
// (minutes on a cold machine) is reported on stderr; the script's output is
// part of the error when it fails.
func Dir() (string, error) {
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(CacheDir(), "test-tools")
	start := time.Now()
	cmd := exec.Command(filepath.Join(root, "scripts", "test-tools.sh"), dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build the test tools (%s): %w\n%s", cmd, err, out)
	}
	if d := time.Since(start); d > 10*time.Second {
		fmt.Fprintf(os.Stderr, "testtools: built SPIRE and step-ca into %s in %s\n", dir, d.Round(time.Second))
	}
	return dir, nil
}

// repoRoot finds the checkout (the directory with scripts/test-tools.sh)
// above the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for range 16 {
		if _, err := os.Stat(filepath.Join(dir, "scripts", "test-tools.sh")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	return "", errors.New("scripts/test-tools.sh not found above the working directory")
}
