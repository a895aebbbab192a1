package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestShippedTagsFollowTheDockerfile: the harness builds meshproxy with the
// build tags of the image's go build, read from deploy/Dockerfile, where the
// command spans continuation lines.
func TestShippedTagsFollowTheDockerfile(t *testing.T) {
	for _, tc := range []struct{ name, dockerfile, want string }{
		{"continued", "FROM golang AS build\nRUN go mod download\nRUN --mount=type=cache,target=/go/pkg/mod \\\n    CGO_ENABLED=0 go build -trimpath -tags noinject,nocloudca -ldflags \"-s -w\" \\\n        -o /out/meshproxy ./cmd/meshproxy\n", "noinject,nocloudca"},
		{"equals", "RUN go build -tags=a,b -o /m ./cmd/meshproxy\n", "a,b"},
		{"comment first", "# a CA image: go build -tags noinject -o m ./cmd/meshproxy\nRUN go build -tags noinject,nocloudca -o /m ./cmd/meshproxy\n", "noinject,nocloudca"},
		{"none", "RUN go build -o /m ./cmd/meshproxy\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if err := os.MkdirAll(filepath.Join(root, "deploy"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(root, "deploy", "Dockerfile"), []byte(tc.dockerfile), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := ShippedTags(root)
			if err != nil || got != tc.want {
				t.Errorf("ShippedTags = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := ShippedTags(t.TempDir()); err == nil {
		t.Error("no Dockerfile: no error")
	}

	// The repository's own Dockerfile leaves the cloud CA SDKs out of the image.
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ShippedTags(root)
	if err != nil || !strings.Contains(got, "nocloudca") {
		t.Errorf("ShippedTags(repository) = %q, %v; want the image's tags (nocloudca among them)", got, err)
	}
}
