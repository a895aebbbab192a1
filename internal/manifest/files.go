package manifest

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"iter"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// MaxFileSize bounds one manifest file; Kubernetes ConfigMaps are at most 1 MiB.
const MaxFileSize = fileread.MaxManifest

// File is one manifest file: its path (as shown in errors) and content.
type File struct {
	Name string
	Data []byte
}

// ReadDir returns the manifest files of dir in name order: *.yaml, *.yml
// and *.json, following symlinks and skipping dot-entries, so the Kubernetes
// ConfigMap layout (name → ..data/name, ..data → ..TIMESTAMP) reads as plain
// files. Subdirectories are not descended into. what names the directory
// in the error when it cannot be listed ("read policy dir: ..."); errors
// about one file name the file.
func ReadDir(dir, what string) ([]File, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read %s dir: %w", what, err)
	}
	var files []File
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			continue
		}
		switch strings.ToLower(filepath.Ext(name)) {
		case ".yaml", ".yml", ".json":
		default:
			continue
		}
		path := filepath.Join(dir, name)
		st, err := os.Stat(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue // a dangling symlink: the file was removed in a ConfigMap update
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if !st.Mode().IsRegular() {
			continue
		}
		data, err := fileread.Read(path, MaxFileSize) // names the path
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed since the listing
		}
		if err != nil {
			return nil, err
		}
		files = append(files, File{Name: path, Data: data})
	}
	return files, nil
}

// Hash fingerprints a directory's content, to reload only on change.
func Hash(files []File) [sha256.Size]byte {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%d:%s%d:", len(f.Name), f.Name, len(f.Data))
		h.Write(f.Data)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// Doc is one object of a manifest file, converted to JSON.
type Doc struct {
	Where string // "FILE: document N" or "FILE: document N: items[i]"
	File  string // the file's name
	Index int    // N: 1-based, counting the file's documents with content
	JSON  []byte
}

// Header returns the object's apiVersion and kind as written; both empty
// when the document is not an object or they are not strings.
func (d Doc) Header() (apiVersion, kind string) {
	var h struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if !bytes.HasPrefix(bytes.TrimSpace(d.JSON), []byte("{")) {
		return "", ""
	}
	_ = json.Unmarshal(d.JSON, &h) // a non-string kind is just not ours
	return h.APIVersion, h.Kind
}

// Kind returns the object's API group, version and kind; all empty when the
// document is not an object.
func (d Doc) Kind() (group, version, kind string) {
	apiVersion, kind := d.Header()
	group, version, _ = strings.Cut(apiVersion, "/")
	if version == "" {
		group, version = "", group
	}
	return group, version, kind
}

// Named is d.Where followed by the kind and namespace/name of the object it
// holds: "FILE: document N (Kind namespace/name)".
func (d Doc) Named(kind, id string) string {
	return fmt.Sprintf("%s (%s %s)", d.Where, kind, id)
}

// Documents splits every file into its objects, expanding `kind: List`
// (as `kubectl get -o yaml` writes). YAML syntax errors are returned with
// the file and line; the other documents are still returned.
func Documents(files []File) ([]Doc, []error) {
	var docs []Doc
	var errs []error
	for d, err := range Objects(files) {
		if err != nil {
			errs = append(errs, err)
		} else {
			docs = append(docs, d)
		}
	}
	return docs, errs
}

// Objects yields the objects of every file in order, as Documents returns
// them, each with a nil error, and each problem (a YAML syntax error with
// the file and line, or a `kind: List` without a list of items) in its
// place among them with a Doc that has only its place (Where, File, Index).
func Objects(files []File) iter.Seq2[Doc, error] {
	return func(yield func(Doc, error) bool) {
		for _, f := range files {
			for _, part := range Split(f.Data) {
				where := fmt.Sprintf("%s: document %d", f.Name, part.Index)
				j, err := yaml.YAMLToJSONStrict(part.Data)
				if err != nil {
					if !yield(Doc{Where: where, File: f.Name, Index: part.Index}, fmt.Errorf("%s: %w", where, syntaxError(err, part.Line))) {
						return
					}
					continue
				}
				if !yieldObject(Doc{Where: where, File: f.Name, Index: part.Index, JSON: j}, yield) {
					return
				}
			}
		}
	}
}

// yieldObject yields d, or the items of d if it is a `kind: List`; it
// reports whether to go on.
func yieldObject(d Doc, yield func(Doc, error) bool) bool {
	if IsNull(d.JSON) {
		return true
	}
	if group, version, kind := d.Kind(); kind != "List" || group != "" || version != "v1" {
		return yield(d, nil)
	}
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(d.JSON, &list); err != nil {
		return yield(Doc{Where: d.Where, File: d.File, Index: d.Index}, fmt.Errorf("%s: items: want a list of objects", d.Where))
	}
	for i, item := range list.Items {
		if !yieldObject(Doc{Where: fmt.Sprintf("%s: items[%d]", d.Where, i), File: d.File, Index: d.Index, JSON: item}, yield) {
			return false
		}
	}
	return true
}

// Part is one YAML document of a file.
type Part struct {
	Index int // 1-based, counting documents with content
	Line  int // file line of the document's first line
	Data  []byte
}

// Split splits a YAML stream at "---" lines; a document may start on the
// marker's line ("--- {inline: document}"). Documents holding only blanks
// and comments are dropped and not counted.
func Split(data []byte) []Part {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	var parts []Part
	start, startLine, line := 0, 1, 1
	content := false
	flush := func(end int) {
		if content {
			parts = append(parts, Part{Index: len(parts) + 1, Line: startLine, Data: data[start:end]})
		}
	}
	for off := 0; off < len(data); line++ {
		next := len(data)
		if end := bytes.IndexByte(data[off:], '\n'); end >= 0 {
			next = off + end + 1
		}
		text := strings.TrimRight(string(data[off:next]), "\r\n")
		if rest, ok := separator(text); ok {
			flush(off)
			start, startLine, content = next, line+1, false
			if r := strings.TrimSpace(rest); r != "" && !strings.HasPrefix(r, "#") {
				start, startLine, content = off+3, line, true // "--- {inline: document}"
			}
		} else if t := strings.TrimSpace(text); t != "" && !strings.HasPrefix(t, "#") {
			content = true
		}
		off = next
	}
	flush(len(data))
	return parts
}

// separator reports whether line is a "---" document marker, and what
// follows it on the line.
func separator(line string) (rest string, ok bool) {
	rest, ok = strings.CutPrefix(line, "---")
	return rest, ok && (rest == "" || rest[0] == ' ' || rest[0] == '\t')
}

var yamlLine = regexp.MustCompile(`\bline (\d+)(: )?`)

// syntaxError turns a sigs.k8s.io/yaml error into "line N: ..." with N
// counted from the start of the file.
func syntaxError(err error, firstLine int) error {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "error converting YAML to JSON: ")
	msg = strings.TrimPrefix(msg, "yaml: ")
	m := yamlLine.FindStringSubmatchIndex(msg)
	if m == nil {
		return errors.New(msg)
	}
	n, _ := strconv.Atoi(msg[m[2]:m[3]])
	msg = strings.TrimSpace(msg[:m[0]] + msg[m[1]:])
	msg = strings.TrimSuffix(strings.TrimPrefix(msg, "unmarshal errors:"), ":")
	return fmt.Errorf("line %d: %s", firstLine+n-1, strings.TrimSpace(msg))
}

// Object is a Kubernetes object whose spec is S.
type Object[S any] struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   Metadata `json:"metadata"`
	Spec       S        `json:"spec"`
	Status     Ignored  `json:"status"`
}

// ID is "namespace/name".
func (o *Object[S]) ID() string { return o.Metadata.Namespace + "/" + o.Metadata.Name }

// Metadata is Kubernetes ObjectMeta: name, namespace and creationTimestamp
// are used, the rest is accepted so `kubectl get -o yaml` output loads, and a
// misspelt key (namepsace) is still an error.
type Metadata struct {
	Name                       string  `json:"name"`
	Namespace                  string  `json:"namespace"`
	CreationTimestamp          Time    `json:"creationTimestamp"`
	GenerateName               Ignored `json:"generateName"`
	SelfLink                   Ignored `json:"selfLink"`
	UID                        Ignored `json:"uid"`
	ResourceVersion            Ignored `json:"resourceVersion"`
	Generation                 Ignored `json:"generation"`
	DeletionTimestamp          Ignored `json:"deletionTimestamp"`
	DeletionGracePeriodSeconds Ignored `json:"deletionGracePeriodSeconds"`
	Labels                     Ignored `json:"labels"`
	Annotations                Ignored `json:"annotations"`
	OwnerReferences            Ignored `json:"ownerReferences"`
	Finalizers                 Ignored `json:"finalizers"`
	ManagedFields              Ignored `json:"managedFields"`
}

// Time is an RFC 3339 timestamp as Kubernetes writes it.
type Time struct{ time.Time }

// UnmarshalJSON parses an RFC 3339 string; "" is the zero time.
func (t *Time) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New("want an RFC 3339 timestamp string")
	}
	if s == "" {
		return nil
	}
	v, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return fmt.Errorf("want an RFC 3339 timestamp: %q", s)
	}
	t.Time = v
	return nil
}

// DecodeObject strictly decodes d into an Object[S]. The apiVersion's
// version must be one of versions; metadata.name is required and must be a
// DNS subdomain; an empty namespace becomes defaultNS (as `kubectl apply`
// without -n does). Errors start with d.Where and, once known, the kind and
// namespace/name.
func DecodeObject[S any](d Doc, versions []string, defaultNS string) (*Object[S], error) {
	var obj Object[S]
	derr := Decode("", d.JSON, &obj)
	if obj.Metadata.Namespace == "" {
		obj.Metadata.Namespace = defaultNS
	}
	where := d.Where
	if obj.Metadata.Name != "" {
		where = d.Named(obj.Kind, obj.ID())
	}
	fail := func(err error) error { return fmt.Errorf("%s: %w", where, err) }
	_, version, _ := d.Kind()
	if !slices.Contains(versions, version) {
		return nil, fail(Errorf("apiVersion", "%q: %s is read in versions %s", obj.APIVersion, obj.Kind, strings.Join(versions, ", ")))
	}
	if derr != nil {
		return nil, fail(derr)
	}
	m := obj.Metadata
	if m.Name == "" {
		return nil, fail(Errorf("metadata.name", "required"))
	}
	if errs := validation.IsDNS1123Subdomain(m.Name); len(errs) > 0 {
		return nil, fail(Errorf("metadata.name", "%q: %s", m.Name, strings.Join(errs, "; ")))
	}
	if errs := validation.IsDNS1123Label(m.Namespace); m.Namespace != "" && len(errs) > 0 {
		return nil, fail(Errorf("metadata.namespace", "%q: %s", m.Namespace, strings.Join(errs, "; ")))
	}
	return &obj, nil
}
