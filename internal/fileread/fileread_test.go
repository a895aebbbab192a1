package fileread

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func write(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestReadReturnsARegularFileThroughSymlinks(t *testing.T) {
	dir := t.TempDir()
	// Kubernetes' volume layout: name -> ..data/name, ..data -> ..TIMESTAMP.
	if err := os.Mkdir(filepath.Join(dir, "..2026"), 0o700); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "..2026", "tls.crt"), []byte("pem"))
	if err := os.Symlink("..2026", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join("..data", "tls.crt"), filepath.Join(dir, "tls.crt")); err != nil {
		t.Fatal(err)
	}
	data, err := Read(filepath.Join(dir, "tls.crt"), MaxPEM)
	if err != nil || string(data) != "pem" {
		t.Fatalf("Read = %q, %v; want the file's content", data, err)
	}
}

func TestReadRefusesFIFOWithoutBlocking(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "tls.crt")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatalf("mkfifo: %v", err)
	}
	// Without O_NONBLOCK the open would wait for a writer forever, and
	// ReadContext would only give up at its deadline: use none here.
	_, err := read(fifo, MaxPEM)
	if !errors.Is(err, ErrNotRegular) || !strings.Contains(err.Error(), fifo) || !strings.Contains(err.Error(), "FIFO") {
		t.Fatalf("FIFO: err %v, want ErrNotRegular naming the path and FIFO", err)
	}
}

func TestReadRefusesOtherNonRegularFiles(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, p := range []string{dir, "/dev/zero"} {
		if _, err := Read(p, MaxPEM); !errors.Is(err, ErrNotRegular) {
			t.Errorf("%s: err %v, want ErrNotRegular", p, err)
		}
	}
	// A socket cannot be opened at all; it must fail, not hang.
	if _, err := Read(sock, MaxPEM); err == nil {
		t.Errorf("socket: read succeeded")
	}
}

func TestReadRefusesFilesOverTheCapWithoutReadingThem(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.crt")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	// Sparse: 400 MB that a whole read would pull into memory.
	if err := f.Truncate(400 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	_, err = Read(path, MaxPEM)
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "more than the 1048576 allowed") {
		t.Fatalf("oversized: err %v, want ErrTooLarge with the cap", err)
	}
}

func TestReadAcceptsAFileExactlyAtTheCap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	write(t, path, make([]byte, 100))
	if data, err := Read(path, 100); err != nil || len(data) != 100 {
		t.Fatalf("at cap: %d bytes, %v", len(data), err)
	}
	if _, err := Read(path, 99); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("one over cap: err %v, want ErrTooLarge", err)
	}
}

func TestReadMissingFileIsNotExist(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing")
	_, err := Read(path, MaxPEM)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Fatalf("missing: err %v, want fs.ErrNotExist naming the path", err)
	}
}
