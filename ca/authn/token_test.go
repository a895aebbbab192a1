package authn

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// replaceFile writes data to path via a rename, as editors and Kubernetes do.
func replaceFile(t *testing.T, path, data string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestTokensAuthenticate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	replaceFile(t, path, `# bootstrap tokens
s3cret-a spiffe://cluster.local/ns/demo/sa/client

  s3cret-b   spiffe://cluster.local/ns/demo/sa/server   # trailing comment
foreign spiffe://other.domain/ns/x/sa/y
`)
	toks, err := NewTokens(path, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		token   string
		want    string
		wantErr error
	}{
		{"known token", "s3cret-a", "spiffe://cluster.local/ns/demo/sa/client", nil},
		{"second token with comment", "s3cret-b", "spiffe://cluster.local/ns/demo/sa/server", nil},
		{"foreign identity is returned as listed", "foreign", "spiffe://other.domain/ns/x/sa/y", nil},
		{"wrong token", "s3cret-c", "", ErrUnauthenticated},
		{"prefix of a token", "s3cret", "", ErrUnauthenticated},
		{"missing token", "", "", ErrNoCredentials},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id, err := toks.Authenticate(context.Background(), Caller{Token: tt.token})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !errors.Is(err, ErrUnauthenticated) {
					t.Fatalf("err = %v, want it to be Unauthenticated", err)
				}
				return
			}
			if err != nil || id.String() != tt.want {
				t.Fatalf("got %v, %v; want %s", id, err, tt.want)
			}
		})
	}
}

func TestTokensFileErrorsNameFileAndLine(t *testing.T) {
	tests := []struct {
		name, content, wantLine string
	}{
		{"one field", "ok spiffe://td/ns/a/sa/b\nlonely\n", ":2:"},
		{"three fields", "a spiffe://td/ns/a/sa/b extra\n", ":1:"},
		{"bad spiffe id", "# c\n\ntok http://td/ns/a/sa/b\n", ":3:"},
		{"duplicate token", "tok spiffe://td/a\ntok spiffe://td/b\n", ":2:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tokens")
			replaceFile(t, path, tt.content)
			_, err := NewTokens(path, WithLogger(quietLogger()))
			if err == nil || !strings.Contains(err.Error(), path+tt.wantLine) {
				t.Fatalf("err = %v, want it to name %s%s", err, path, tt.wantLine)
			}
			if strings.Contains(err.Error(), "tok ") {
				t.Fatalf("error leaks the token: %v", err)
			}
		})
	}
	if _, err := NewTokens(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("missing tokens file accepted")
	}
}

func TestTokensReloadKeepsLastGoodSet(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tokens")
	replaceFile(t, path, "old-token spiffe://cluster.local/ns/a/sa/old\n")
	toks, err := NewTokens(path, WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	auth := func(tok string) (string, error) {
		id, err := toks.Authenticate(context.Background(), Caller{Token: tok})
		return id.String(), err
	}
	if _, err := auth("old-token"); err != nil {
		t.Fatal(err)
	}

	replaceFile(t, path, "new-token spiffe://cluster.local/ns/a/sa/new\n")
	if _, err := auth("old-token"); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("removed token still accepted: %v", err)
	}
	if id, err := auth("new-token"); err != nil || id != "spiffe://cluster.local/ns/a/sa/new" {
		t.Fatalf("added token: %s, %v", id, err)
	}

	replaceFile(t, path, "this line is broken\n")
	if id, err := auth("new-token"); err != nil || id != "spiffe://cluster.local/ns/a/sa/new" {
		t.Fatalf("after a bad reload the last good set must stay: %s, %v", id, err)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, err := auth("new-token"); err != nil {
		t.Fatalf("after the file vanished the last good set must stay: %v", err)
	}

	replaceFile(t, path, "fixed-token spiffe://cluster.local/ns/a/sa/fixed\n")
	if _, err := auth("fixed-token"); err != nil {
		t.Fatalf("fixed file not picked up: %v", err)
	}
}

func TestTokensReloadFollowsKubernetesSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	for _, v := range []string{"v1", "v2"} {
		if err := os.Mkdir(filepath.Join(dir, v), 0o700); err != nil {
			t.Fatal(err)
		}
		replaceFile(t, filepath.Join(dir, v, "tokens"), "tok-"+v+" spiffe://cluster.local/ns/a/sa/"+v+"\n")
	}
	if err := os.Symlink("v1", filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("..data/tokens", filepath.Join(dir, "tokens")); err != nil {
		t.Fatal(err)
	}
	toks, err := NewTokens(filepath.Join(dir, "tokens"), WithLogger(quietLogger()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := toks.Authenticate(context.Background(), Caller{Token: "tok-v1"}); err != nil {
		t.Fatal(err)
	}
	// Kubernetes updates a mounted secret by repointing ..data atomically.
	if err := os.Symlink("v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	if id, err := toks.Authenticate(context.Background(), Caller{Token: "tok-v2"}); err != nil || id.String() != "spiffe://cluster.local/ns/a/sa/v2" {
		t.Fatalf("after the swap: %v, %v", id, err)
	}
	if _, err := toks.Authenticate(context.Background(), Caller{Token: "tok-v1"}); !errors.Is(err, ErrUnauthenticated) {
		t.Fatalf("old token accepted after the swap: %v", err)
	}
}
