package harness

import (
	"os"
	"os/exec"
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

// TestBuildBaselineExportsTheCommit: the baseline is built from the named
// commit's tree (not the working tree), with that commit's Dockerfile tags,
// and a name that is not a commit, or looks like an option, is refused
// before anything is built.
func TestBuildBaselineExportsTheCommit(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git not installed")
	}
	repo := t.TempDir()
	gitIn := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", repo, "-c", "user.name=t", "-c", "user.email=t@t"}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	write := func(name, body string) {
		t.Helper()
		p := filepath.Join(repo, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A module whose cmd/meshproxy prints which commit it was built from;
	// the tag must come from that commit's Dockerfile.
	gitIn("init", "-q")
	write("go.mod", "module example.com/m\n\ngo 1.26\n")
	write("deploy/Dockerfile", "RUN go build -tags old -o /m ./cmd/meshproxy\n")
	write("cmd/meshproxy/main.go", "//go:build old\n\npackage main\n\nfunc main() { println(\"old\") }\n")
	gitIn("add", ".")
	gitIn("commit", "-q", "-m", "old")
	gitIn("tag", "old")
	write("deploy/Dockerfile", "RUN go build -tags new -o /m ./cmd/meshproxy\n")
	write("cmd/meshproxy/main.go", "//go:build new\n\npackage main\n\nfunc main() { println(\"new\") }\n")
	gitIn("commit", "-q", "-am", "new")

	out := filepath.Join(t.TempDir(), "baseline")
	commit, tags, err := BuildBaseline(t.Context(), repo, "old", t.TempDir(), out)
	if err != nil {
		t.Fatal(err)
	}
	if tags != "old" || len(commit) != 40 {
		t.Errorf("BuildBaseline = commit %q, tags %q; want a full hash and tags old", commit, tags)
	}
	b, err := exec.Command(out).CombinedOutput()
	if err != nil || strings.TrimSpace(string(b)) != "old" {
		t.Errorf("baseline binary printed %q (%v), want old", b, err)
	}
	for _, ref := range []string{"no-such-commit", "--output=/tmp/x"} {
		if _, _, err := BuildBaseline(t.Context(), repo, ref, t.TempDir(), out); err == nil {
			t.Errorf("BuildBaseline(%q): no error", ref)
		}
	}
}
