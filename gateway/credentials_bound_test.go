package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestCredentialReadRefusesFIFOAndOversizedFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "shop.crt")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatalf("mkfifo: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := readBounded(fifo)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("FIFO credential: err %v, want a refusal naming it", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("reading a FIFO credential blocked: reloads would hang")
	}

	big := filepath.Join(dir, "big.key")
	if err := os.WriteFile(big, make([]byte, maxCredentialFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readBounded(big); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("oversized credential: err %v, want a refusal", err)
	}
	ok := filepath.Join(dir, "ok.crt")
	if err := os.WriteFile(ok, []byte("pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	if data, err := readBounded(ok); err != nil || string(data) != "pem" {
		t.Fatalf("regular credential: %q, %v", data, err)
	}
}
