package authn

import (
	"path/filepath"
	"strings"
	"testing"
)

// A tokens file with its columns swapped must not put the token into the
// error, which is logged on every reload.
func TestTokensFileErrorNeverQuotesAToken(t *testing.T) {
	const secret = "s3cr3t-bootstrap-token-0123456789"
	for name, content := range map[string]string{
		"columns swapped":       "spiffe://td/ns/a/sa/b " + secret + "\n",
		"token in the id field": "ok spiffe://td/ns/a/sa/b\n" + secret + " " + secret + "x\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "tokens")
			replaceFile(t, path, content)
			_, err := NewTokens(path, WithLogger(quietLogger()))
			if err == nil {
				t.Fatal("malformed tokens file accepted")
			}
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error quotes the token: %v", err)
			}
		})
	}
}
