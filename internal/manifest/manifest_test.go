package manifest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	files, err := ReadDir(dir, "config")
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

func TestSplitKeepsInlineDocumentsAndFileLines(t *testing.T) {
	in := "\xef\xbb\xbf# header comment\n---\na: 1\n--- # comment only\n# nothing\n---\nb: 2\nc: 3\n--- {d: 4}\n---\r\ne: 5\n---not-a-separator: 6\n"
	want := []Part{
		{Index: 1, Line: 3, Data: []byte("a: 1\n")},
		{Index: 2, Line: 7, Data: []byte("b: 2\nc: 3\n")},
		{Index: 3, Line: 9, Data: []byte(" {d: 4}\n")},
		{Index: 4, Line: 11, Data: []byte("e: 5\n---not-a-separator: 6\n")},
	}
	got := Split([]byte(in))
	if len(got) != len(want) {
		t.Fatalf("got %d documents: %+v", len(got), got)
	}
	for i := range want {
		if got[i].Index != want[i].Index || got[i].Line != want[i].Line || string(got[i].Data) != string(want[i].Data) {
			t.Errorf("document %d = {%d %d %q}, want {%d %d %q}", i, got[i].Index, got[i].Line, got[i].Data, want[i].Index, want[i].Line, want[i].Data)
		}
	}
}

func TestObjectsReportsProblemsInFileOrder(t *testing.T) {
	files := []File{
		{Name: "a.yaml", Data: []byte("kind: [\n---\nkind: A\n---\napiVersion: v1\nkind: List\nitems: {}\n---\nkind: B\n")},
		{Name: "b.json", Data: []byte("{\"kind\": \"C\"}")},
	}
	var got []string
	for d, err := range Objects(files) {
		if err != nil {
			got = append(got, "error "+err.Error())
			continue
		}
		_, _, k := d.Kind()
		got = append(got, d.Where+" "+k)
	}
	want := []string{
		"error a.yaml: document 1: line 1: did not find expected node content",
		"a.yaml: document 2 A",
		"error a.yaml: document 3: items: want a list of objects",
		"a.yaml: document 4 B",
		"b.json: document 1 C",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("objects:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Stopping early must not call yield again (range-over-func would panic).
	n := 0
	for range Objects(files) {
		n++
		break
	}
	if n != 1 {
		t.Errorf("ranged %d times after break", n)
	}
}

func TestReadDirReadsAConfigMapMount(t *testing.T) {
	dir := t.TempDir()
	// The kubelet's layout: ..2024_01_01/x.yaml, ..data → ..2024_01_01, x.yaml → ..data/x.yaml.
	ts := filepath.Join(dir, "..2024_01_01")
	if err := os.Mkdir(ts, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ts, "x.yaml"), []byte("kind: X\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{"..data": "..2024_01_01", "x.yaml": "..data/x.yaml", "gone.yaml": "..data/gone.yaml"} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub.yaml"), 0o700); err != nil {
		t.Fatal(err)
	}
	files, err := ReadDir(dir, "policy")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || files[0].Name != filepath.Join(dir, "x.yaml") || string(files[0].Data) != "kind: X\n" {
		t.Fatalf("files = %+v, want only x.yaml through the symlinks", files)
	}

	if err := os.WriteFile(filepath.Join(dir, "big.json"), make([]byte, MaxFileSize+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadDir(dir, "policy"); err == nil || !strings.Contains(err.Error(), "big.json: file is") {
		t.Errorf("oversized file: err = %v", err)
	}
	_, err = ReadDir(filepath.Join(dir, "missing"), "policy")
	if !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "read policy dir: ") {
		t.Errorf("missing dir: err = %v", err)
	}
}

func TestDecodeObjectChecksVersionAndMetadata(t *testing.T) {
	const head = "apiVersion: example.io/v1\nkind: Thing\n"
	tests := []struct {
		name, yaml string
		want       string // error; "" for success
	}{
		{"kubectl get output loads", head + "metadata:\n  name: a\n  uid: x\n  resourceVersion: \"1\"\n  labels: {a: b}\n  managedFields: [{}]\nspec:\n  port: 1\nstatus: {anything: 1}\n", ""},
		{"wrong version", "apiVersion: example.io/v2\nkind: Thing\nmetadata:\n  name: a\nspec: {}\n",
			`f.yaml: document 1 (Thing ns/a): apiVersion: "example.io/v2": Thing is read in versions v1, v1beta1`},
		{"misspelt metadata", head + "metadata:\n  name: a\n  namepsace: b\n", `f.yaml: document 1 (Thing ns/a): metadata.namepsace: unknown field "namepsace"`},
		{"missing name", head + "metadata:\n  namespace: b\n", "f.yaml: document 1: metadata.name: required"},
		{"bad name", head + "metadata:\n  name: Bad_Name\n", `f.yaml: document 1 (Thing ns/Bad_Name): metadata.name: "Bad_Name": `},
		{"bad namespace", head + "metadata:\n  name: a\n  namespace: a.b\n", `f.yaml: document 1 (Thing a.b/a): metadata.namespace: "a.b": `},
		{"bad timestamp", head + "metadata:\n  name: a\n  creationTimestamp: yesterday\n", `metadata.creationTimestamp: want an RFC 3339 timestamp: "yesterday"`},
		{"unknown spec field", head + "metadata:\n  name: a\nspec:\n  prot: 1\n", `(Thing ns/a): spec.prot: unknown field "prot"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			docs, errs := Documents([]File{{Name: "f.yaml", Data: []byte(tt.yaml)}})
			if len(errs) != 0 || len(docs) != 1 {
				t.Fatalf("documents: %d, errors: %v", len(docs), errs)
			}
			obj, err := DecodeObject[struct {
				Port int `json:"port"`
			}](docs[0], []string{"v1", "v1beta1"}, "ns")
			if tt.want == "" {
				if err != nil || obj.ID() != "ns/a" || obj.Spec.Port != 1 {
					t.Fatalf("obj = %+v, err = %v", obj, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v\nwant it to contain %q", err, tt.want)
			}
		})
	}
}

func TestTimeParsesRFC3339(t *testing.T) {
	docs, _ := Documents([]File{{Name: "f.yaml", Data: []byte("kind: Thing\napiVersion: v1\nmetadata:\n  name: a\n  creationTimestamp: \"2024-05-06T07:08:09Z\"\n")}})
	obj, err := DecodeObject[struct{}](docs[0], []string{"v1"}, "ns")
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC); !obj.Metadata.CreationTimestamp.Equal(want) {
		t.Errorf("creationTimestamp = %v, want %v", obj.Metadata.CreationTimestamp, want)
	}
	if got := docs[0].Named("Thing", obj.ID()); got != "f.yaml: document 1 (Thing ns/a)" {
		t.Errorf("Named = %q", got)
	}
}
