// Package certmanagerbin finds, building it when missing or stale,
// cert-manager's controller that test/certmanager builds from cert-manager's
// Go module, and cert-manager's CRDs from the same module, in the cache
// directory both the loopback cert-manager test (test/certmanagerint) and
// the cluster suite (test/cluster) use. It is for tests only.
package certmanagerbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Version is the cert-manager release test/certmanager's go.mod requires.
const Version = "v1.21.2"

// Binaries are the built controller and the directory of CRD manifests.
type Binaries struct {
	// Controller is the cert-manager-controller executable.
	Controller string
	// CRDs holds cert-manager's deploy/crds/*.yaml.
	CRDs string
}

// CacheDir is ${MESHPROXY_CACHE:-$HOME/.cache/meshproxy}.
func CacheDir() string {
	if d := os.Getenv("MESHPROXY_CACHE"); d != "" {
		return d
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".cache", "meshproxy")
}

// Find returns the controller and CRDs under CacheDir, building the
// controller from moduleDir (test/certmanager) when it is missing or was
// built from other sources, and copying the CRDs out of the
// module cache when they are not there yet.
func Find(moduleDir string) (Binaries, error) {
	dir := filepath.Join(CacheDir(), "cert-manager-"+Version)
	b := Binaries{Controller: filepath.Join(dir, "cert-manager-controller"), CRDs: filepath.Join(dir, "crds")}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return b, fmt.Errorf("cert-manager cache: %w", err)
	}
	// scripts/cached-build.sh rebuilds only when the module, the flags or Go
	// change. The controller signs a few test certificates: built without
	// optimisations (-N -l), it takes a third less CPU to compile cold.
	script := filepath.Join(moduleDir, "..", "..", "scripts", "cached-build.sh")
	build := exec.Command(script, "cert-manager-controller", moduleDir, b.Controller, "--",
		"-trimpath", "-gcflags", "all=-N -l", "-ldflags", "-s -w", "-o", b.Controller, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return b, fmt.Errorf("build cert-manager controller: %w\n%s", err, out)
	}
	if _, err := os.Stat(b.CRDs); err == nil {
		return b, nil
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/cert-manager/cert-manager")
	cmd.Dir = moduleDir
	out, err := cmd.Output()
	if err != nil {
		return b, fmt.Errorf("find cert-manager's module: %w", err)
	}
	src := filepath.Join(strings.TrimSpace(string(out)), "deploy", "crds")
	files, err := filepath.Glob(filepath.Join(src, "*.yaml"))
	if err != nil || len(files) == 0 {
		return b, fmt.Errorf("no CRDs in %s", src)
	}
	// Copied into a temporary directory renamed into place, so a reader
	// never sees half of them.
	tmp, err := os.MkdirTemp(dir, "crds-")
	if err != nil {
		return b, fmt.Errorf("copy CRDs: %w", err)
	}
	defer os.RemoveAll(tmp)
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
		if err := os.WriteFile(filepath.Join(tmp, filepath.Base(f)), data, 0o644); err != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return b, fmt.Errorf("copy CRDs: %w", err)
	}
	if err := os.Rename(tmp, b.CRDs); err != nil && !os.IsExist(err) {
		if _, statErr := os.Stat(b.CRDs); statErr != nil {
			return b, fmt.Errorf("copy CRDs: %w", err)
		}
	}
	return b, nil
}
