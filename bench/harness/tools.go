package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// ModulePath is the Go module whose commands the harness builds.
const ModulePath = "github.com/meshproxy/meshproxy"

// ModuleRoot finds the meshproxy module's directory by walking up from the
// working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("find module root: %w", err)
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(bytes.TrimSpace(b), []byte("module "+ModulePath+"\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("find module root: no go.mod of %s above the working directory", ModulePath)
		}
		dir = parent
	}
}

// Build builds ./pkg of the module root into out the way `make build`
// builds the release binary: static (CGO_ENABLED=0), -trimpath, stripped.
// Memory figures depend on it: a cgo build maps libc as well.
func Build(ctx context.Context, root, pkg, out string) error {
	return build(ctx, root, pkg, out, "")
}

// BuildMeshproxy builds ./cmd/meshproxy into out as the image ships it:
// Build's flags plus the build tags of deploy/Dockerfile (ShippedTags),
// which leave out what no pod runs (inject, the cloud CA SDKs) and so change
// the sidecar's memory. It returns the tags it used.
func BuildMeshproxy(ctx context.Context, root, out string) (string, error) {
	tags, err := ShippedTags(root)
	if err != nil {
		return "", err
	}
	return tags, build(ctx, root, "cmd/meshproxy", out, tags)
}

// BuildBaseline builds the meshproxy of git commit ref (of the repository
// at root) into out, as that commit's deploy/Dockerfile built it: its
// tree is exported with `git archive` into a new directory under tmp (no
// worktree left behind) and built there. It returns the full commit hash
// and the tags it used. The repository must hold ref's history (a shallow
// clone may not).
func BuildBaseline(ctx context.Context, root, ref, tmp, out string) (commit, tags string, err error) {
	if strings.HasPrefix(ref, "-") {
		return "", "", fmt.Errorf("baseline %q: not a commit", ref)
	}
	rev := exec.CommandContext(ctx, "git", "-C", root, "rev-parse", "--verify", "--end-of-options", ref+"^{commit}")
	b, err := rev.Output()
	if err != nil {
		return "", "", fmt.Errorf("baseline %q: not a commit of %s (a shallow clone lacks old commits: git fetch --unshallow): %w", ref, root, err)
	}
	commit = strings.TrimSpace(string(b))
	src, err := os.MkdirTemp(tmp, "baseline-src-")
	if err != nil {
		return "", "", err
	}
	defer os.RemoveAll(src)
	archive := exec.CommandContext(ctx, "git", "-C", root, "archive", "--format=tar", commit)
	untar := exec.CommandContext(ctx, "tar", "-x", "-C", src)
	pipe, err := archive.StdoutPipe()
	if err != nil {
		return "", "", err
	}
	untar.Stdin = pipe
	var archiveErr, untarErr bytes.Buffer // one each: the two run at once
	archive.Stderr, untar.Stderr = &archiveErr, &untarErr
	if err := untar.Start(); err != nil {
		return "", "", fmt.Errorf("baseline: tar: %w", err)
	}
	aerr := archive.Run()
	if err := errors.Join(aerr, untar.Wait()); err != nil {
		return "", "", fmt.Errorf("baseline: export %s: %w: %s%s", commit, err, archiveErr.Bytes(), untarErr.Bytes())
	}
	tags, err = BuildMeshproxy(ctx, src, out)
	if err != nil {
		return "", "", fmt.Errorf("baseline %s: %w", commit, err)
	}
	return commit, tags, nil
}

// ShippedTags reads the -tags of the go build of ./cmd/meshproxy in the
// module's deploy/Dockerfile ("" if it gives none).
func ShippedTags(root string) (string, error) {
	path := filepath.Join(root, "deploy", "Dockerfile")
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("shipped build tags: %w", err)
	}
	// Join continuation lines, then find the RUN instruction (not a comment)
	// that builds the binary.
	text := strings.ReplaceAll(string(data), "\\\n", " ")
	for line := range strings.Lines(text) {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.EqualFold(f[0], "RUN") || !slices.Contains(f, "build") || !slices.Contains(f, "./cmd/meshproxy") {
			continue
		}
		for i, a := range f {
			if a == "-tags" && i+1 < len(f) {
				return f[i+1], nil
			}
			if v, ok := strings.CutPrefix(a, "-tags="); ok {
				return v, nil
			}
		}
		return "", nil
	}
	return "", fmt.Errorf("shipped build tags: no go build of ./cmd/meshproxy in %s", path)
}

// ghostunnelDir is the module, under the module root, that pins ghostunnel.
const ghostunnelDir = "bench/ghostunnel"

// BuildGhostunnel builds the ghostunnel bench/ghostunnel pins into out
// (-trimpath, stripped, with cgo: its release does not build without) and
// returns its version.
func BuildGhostunnel(ctx context.Context, root, out string) (version string, err error) {
	const pkg = "github.com/ghostunnel/ghostunnel"
	dir := filepath.Join(root, ghostunnelDir)
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", pkg)
	cmd.Dir = dir
	b, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("ghostunnel version (%s): %w", ghostunnelDir, err)
	}
	version = strings.TrimSpace(string(b))
	cmd = exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, pkg)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build ghostunnel %s (%s): %w\n%s", version, ghostunnelDir, err, b)
	}
	return version, nil
}

func build(ctx context.Context, root, pkg, out, tags string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("build %s: go not in PATH: %w", pkg, err)
	}
	args := []string{"build", "-trimpath", "-ldflags", "-s -w"}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	cmd := exec.CommandContext(ctx, goBin, append(args, "-o", out, "./"+pkg)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./%s: %w\n%s", pkg, err, b)
	}
	return nil
}

// FindPeerBinaries looks up haproxy and stunnel (Debian's stunnel4 installs
// both names) in PATH and /usr/sbin; missing ones stay empty.
func FindPeerBinaries(b *Binaries) {
	look := func(names ...string) string {
		for _, n := range names {
			if p, err := exec.LookPath(n); err == nil {
				return p
			}
			if p := filepath.Join("/usr/sbin", n); isExecutable(p) {
				return p
			}
		}
		return ""
	}
	if b.HAProxy == "" {
		b.HAProxy = look("haproxy")
	}
	if b.Stunnel == "" {
		b.Stunnel = look("stunnel4", "stunnel")
	}
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// InstallPeers installs the Debian packages of missing peers with apt-get.
func InstallPeers(ctx context.Context, b Binaries) error {
	var pkgs []string
	if b.HAProxy == "" {
		pkgs = append(pkgs, "haproxy")
	}
	if b.Stunnel == "" {
		pkgs = append(pkgs, "stunnel4")
	}
	if len(pkgs) == 0 {
		return nil
	}
	for _, args := range [][]string{{"update", "-qq"}, append([]string{"install", "-y", "-qq", "--no-install-recommends"}, pkgs...)} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get %s: %w\n%s", strings.Join(args, " "), err, out)
		}
	}
	return nil
}

// RaiseFileLimit lifts the soft RLIMIT_NOFILE to the hard limit. Calling
// Setrlimit explicitly also makes children inherit the raised limit (Go
// restores the original one for children otherwise), which HAProxy and
// stunnel need for the idle-connection scenario.
func RaiseFileLimit() (uint64, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("getrlimit: %w", err)
	}
	l.Cur = l.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, fmt.Errorf("setrlimit: %w", err)
	}
	return l.Cur, nil
}

// StartEcho starts the echo app binary (bench/cmd/echo) on a free loopback
// port and returns its address, read from the app's first output line.
func (e *Env) StartEcho(ctx context.Context, bin string) (*Proc, string, error) {
	p, err := e.Start("echo", bin, "-listen", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	e.echo = p
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	for {
		if addr, ok := echoAddr(p.LogPath); ok {
			return p, addr, nil
		}
		if err := p.ExitError(); err != nil {
			return nil, "", fmt.Errorf("echo app: %w:\n%s", err, p.LogTail(10))
		}
		select {
		case <-ctx.Done():
			e.stop(p)
			return nil, "", errors.New("echo app did not report its address")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// echoAddr reads "listening ADDR" from the echo app's log.
func echoAddr(log string) (string, bool) {
	f, err := os.Open(log)
	if err != nil {
		return "", false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if a, ok := strings.CutPrefix(s.Text(), "listening "); ok {
			return strings.TrimSpace(a), true
		}
	}
	return "", false
}
