package manifest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

type spec struct {
	Port  uint32      `json:"port"`
	Hosts []string    `json:"hosts"`
	Bind  Unsupported `json:"bind" why:"no binding here"`
}

func TestDecodeNamesTheFieldPath(t *testing.T) {
	tests := []struct {
		json string
		want string
	}{
		{`{"hosts": ["a"], "hostz": 1}`, `spec.hostz: unknown field "hostz"`},
		{`{"bind": "10.0.0.1"}`, `spec.bind: not supported by meshproxy: no binding here`},
		{`{"port": "x"}`, `spec.port: want uint32, got string`},
		{`{"hosts": "a"}`, `spec.hosts: want a list, got a string`},
		{`{"Port": 1}`, `spec.Port: unknown field "Port"`}, // keys are case-sensitive
	}
	for _, tc := range tests {
		var s spec
		err := Decode("spec", []byte(tc.json), &s)
		if err == nil || err.Error() != tc.want {
			t.Errorf("Decode(%s) = %v, want %q", tc.json, err, tc.want)
		}
	}
	var s spec
	if err := Decode("spec", []byte(`{"port": 443, "hosts": ["a"], "bind": null}`), &s); err != nil || s.Port != 443 {
		t.Errorf("valid document: %+v, %v", s, err)
	}
}

func TestDocumentsSplitsFilesAndLists(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a.yaml", "# comment only\n---\nkind: A\n---\napiVersion: v1\nkind: List\nitems:\n- kind: B\n- kind: C\n---\nkind: [\n")
	write(".hidden.yaml", "kind: Hidden\n")
	write("notes.txt", "kind: Text\n")
	files, err := ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 {
		t.Fatalf("read %d files, want only a.yaml", len(files))
	}
	docs, errs := Documents(files)
	var kinds []string
	for _, d := range docs {
		_, _, k := d.Kind()
		kinds = append(kinds, k+"@"+d.Where[strings.LastIndex(d.Where, "document"):])
	}
	if got := strings.Join(kinds, " "); got != "A@document 1 B@document 2: items[0] C@document 2: items[1]" {
		t.Errorf("documents = %s", got)
	}
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "a.yaml: document 3: line 11") {
		t.Errorf("errors = %v, want a syntax error at document 3, line 11", errs)
	}
}
