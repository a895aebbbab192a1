package policy

import (
	"maps"
	"strings"
	"testing"
)

func TestReadLabelsFileDownwardAPIFormat(t *testing.T) {
	// As the kubelet writes metadata.labels into a downwardAPI volume.
	path := writeFile(t, t.TempDir(), "labels", "app=\"payments\"\npod-template-hash=\"7d4b9c5f8\"\nsecurity.istio.io/tlsMode=\"istio\"\nservice.istio.io/canonical-name=\"payments\"\nversion=\"\"\n\nplain=unquoted\n")
	got, err := ReadLabelsFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"app": "payments", "pod-template-hash": "7d4b9c5f8", "security.istio.io/tlsMode": "istio",
		"service.istio.io/canonical-name": "payments", "version": "", "plain": "unquoted",
	}
	if !maps.Equal(got, want) {
		t.Errorf("labels = %v, want %v", got, want)
	}
}

func TestReadLabelsFileErrorsNameTheLine(t *testing.T) {
	tests := []struct{ name, content, want string }{
		{"no equals", "app=\"a\"\njunk\n", "line 2: want key=\"value\""},
		{"bad quoting", "app=\"a\n", "line 1: bad quoted value"},
		{"bad key", "bad key=\"a\"\n", "line 1: label key"},
		{"bad value", "app=\"has spaces\"\n", "line 1: label app value"},
		{"too long value", "app=\"" + strings.Repeat("a", 64) + "\"\n", "line 1: label app value"},
		{"duplicate", "app=\"a\"\napp=\"b\"\n", "line 2: label app set twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "labels", tt.content)
			_, err := ReadLabelsFile(path)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("err = %v, want it to name %s and %q", err, path, tt.want)
			}
		})
	}
	if _, err := ReadLabelsFile("/nonexistent/labels"); err == nil {
		t.Error("missing file accepted")
	}
}
