package policy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/util/validation"
)

// FuzzReadLabelsFile feeds arbitrary bytes as the downward-API labels file.
// Every error must name the file; every label read must be a valid
// Kubernetes label, since labels select the policies that apply.
// Seeds: testdata/fuzz/FuzzReadLabelsFile.
func FuzzReadLabelsFile(f *testing.F) {
	path := filepath.Join(f.TempDir(), "labels")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		labels, err := ReadLabelsFile(path)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "labels file "+path) {
				t.Fatalf("error does not name the file: %q", err)
			}
			return
		}
		for k, v := range labels {
			if errs := validation.IsQualifiedName(k); len(errs) > 0 {
				t.Fatalf("invalid key %q accepted: %v", k, errs)
			}
			if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
				t.Fatalf("invalid value %q for %s accepted: %v", v, k, errs)
			}
		}
	})
}
