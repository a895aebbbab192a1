package e2eutil

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Build compiles github.com/meshproxy/meshproxy/cmd/meshproxy into dir and
// returns the binary's path. Call it once from TestMain (see Main).
func Build(dir string) (string, error) {
	return BuildContext(context.Background(), dir)
}

// BuildContext is Build, stopped when ctx is done.
func BuildContext(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "meshproxy")
	cmd := BuildCommand(ctx, bin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build meshproxy: %w\n%s", err, out.String())
	}
	return bin, nil
}

// BuildCommand is the go build of github.com/meshproxy/meshproxy/cmd/meshproxy
// into out that every test uses, with extra go build flags (e.g. -tags)
// before the package: a static build with -trimpath, as deploy/Dockerfile
// ships it, and as `make lint` compiles for go vet and staticcheck, so that
// one compile of the module's dependencies serves all of them (CGO_ENABLED
// and -trimpath each change every package's build; a cold CI machine would
// otherwise compile the whole tree once per combination). The command runs
// in the current directory, which must be inside the module.
func BuildCommand(ctx context.Context, out string, extra ...string) *exec.Cmd {
	args := append([]string{"build", "-trimpath"}, extra...)
	args = append(args, "-o", out, "github.com/meshproxy/meshproxy/cmd/meshproxy")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	return cmd
}

// EnvWithout is os.Environ without the variables starting with any of
// prefixes ("NAME=" for one variable), for a child that must not inherit
// them.
func EnvWithout(prefixes ...string) []string {
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

// Buffer is a bytes.Buffer safe for a process writing while a test reads.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write implements io.Writer.
func (s *Buffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *Buffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Lines returns the complete lines written so far.
func (s *Buffer) Lines() []string {
	out := s.String()
	if i := strings.LastIndexByte(out, '\n'); i >= 0 {
		return strings.Split(out[:i], "\n")
	}
	return nil
}

// Result is the outcome of a command run to completion.
type Result struct {
	Code   int
	Stdout string
	Stderr string
}

// Run runs bin with args to completion (bounded by 60 s), with env added to
// the environment.
func Run(t testing.TB, bin string, env []string, args ...string) Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s %v: %v", filepath.Base(bin), args, err)
	}
	return Result{Code: code, Stdout: out.String(), Stderr: errb.String()}
}

// Process is a long-running process started by Start.
type Process struct {
	// Cmd is the running command; read Cmd.ProcessState only after Done.
	Cmd *exec.Cmd
	// Output collects stdout and stderr.
	Output *Buffer
	done   chan struct{}
	err    error
}

// Start launches bin with args (env added to the environment). It is killed
// at test cleanup, and by the kernel if the test binary dies; its output is
// logged if the test failed.
func Start(t testing.TB, bin string, env []string, args ...string) *Process {
	t.Helper()
	p := &Process{Cmd: exec.Command(bin, args...), Output: &Buffer{}, done: make(chan struct{})}
	p.Cmd.Env = append(os.Environ(), env...)
	p.Cmd.Stdout, p.Cmd.Stderr = p.Output, p.Output
	p.Cmd.SysProcAttr = sysProcAttr()
	if err := p.Cmd.Start(); err != nil {
		t.Fatalf("start %s %v: %v", filepath.Base(bin), args, err)
	}
	go func() {
		p.err = p.Cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		_ = p.Cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("%s %v output:\n%s", filepath.Base(bin), args, p.Output.String())
		}
	})
	return p
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the process's exit error; valid after Done.
func (p *Process) Err() error { return p.err }

// PID is the process id.
func (p *Process) PID() int { return p.Cmd.Process.Pid }

// Stop sends SIGTERM and waits (bounded) for the exit code.
func (p *Process) Stop(t testing.TB, within time.Duration) int {
	t.Helper()
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("process %d did not exit within %s of SIGTERM", p.PID(), within)
	}
	return p.Cmd.ProcessState.ExitCode()
}

// Kill sends SIGKILL and waits for the process to be gone.
func (p *Process) Kill(t testing.TB) {
	t.Helper()
	_ = p.Cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("process %d still there 30s after SIGKILL", p.PID())
	}
}
