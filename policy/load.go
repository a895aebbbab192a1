package policy

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

const (
	// maxFileSize bounds one policy file; Kubernetes ConfigMaps are at most 1 MiB.
	maxFileSize = 4 << 20
	// maxErrors bounds how many problems one load reports.
	maxErrors = 20
)

// meta identifies one loaded object and where it came from.
type meta struct {
	kind, namespace, name string
	created               time.Time
}

func (m meta) id() string { return m.namespace + "/" + m.name }

// compare orders objects as Istio breaks ties: oldest creationTimestamp
// first, then by name.
func (m meta) compare(o meta) int {
	if c := m.created.Compare(o.created); c != 0 {
		return c
	}
	return cmp.Or(cmp.Compare(m.name, o.name), cmp.Compare(m.namespace, o.namespace))
}

func (m meta) before(o meta) bool { return m.compare(o) < 0 }

// docSet is the validated content of a policy directory, not yet resolved
// for a workload.
type docSet struct {
	peerAuths []*peerAuthPolicy
	authz     []*authzPolicy
	dests     []*destRule
}

// file is one policy file's name (as shown in errors) and content.
type file struct {
	name string
	data []byte
}

// readDir returns the policy files of dir in name order: *.yaml, *.yml and
// *.json, following symlinks and skipping dot-entries, so the Kubernetes
// ConfigMap layout (name → ..data/name, ..data → ..TIMESTAMP) reads as plain
// files. Subdirectories are not descended into.
func readDir(dir string) ([]file, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read policy dir: %w", err)
	}
	var files []file
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
		if st.Size() > maxFileSize {
			return nil, fmt.Errorf("%s: file is %d bytes, more than the %d allowed", path, st.Size(), maxFileSize)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		files = append(files, file{name: path, data: data})
	}
	return files, nil
}

// hashFiles fingerprints a directory's content, to reload only on change.
func hashFiles(files []file) [sha256.Size]byte {
	h := sha256.New()
	for _, f := range files {
		fmt.Fprintf(h, "%d:%s%d:", len(f.name), f.name, len(f.data))
		h.Write(f.data)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// loader parses and validates documents into a docSet.
type loader struct {
	wlNamespace string
	td          spiffeid.TrustDomain
	log         *slog.Logger
	set         docSet
	seen        map[string]string // kind/namespace/name → where first defined
	errs        []error
}

func newLoader(wlNamespace string, td spiffeid.TrustDomain, log *slog.Logger) *loader {
	return &loader{wlNamespace: wlNamespace, td: td, log: log, seen: map[string]string{}}
}

// load validates all files as one unit: any error fails the whole set.
func (l *loader) load(files []file) (*docSet, error) {
	for _, f := range files {
		l.addFile(f.name, f.data)
	}
	if len(l.errs) > 0 {
		if len(l.errs) > maxErrors {
			l.errs = append(l.errs[:maxErrors], fmt.Errorf("… and %d more errors", len(l.errs)-maxErrors))
		}
		return nil, errors.Join(l.errs...)
	}
	return &l.set, nil
}

// document is one YAML document of a file.
type document struct {
	index int // 1-based, counting documents with content
	line  int // file line of the document's first line
	data  []byte
}

// splitDocuments splits a YAML stream at "---" lines. Documents holding
// only blanks and comments are dropped and not counted.
func splitDocuments(data []byte) []document {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	var docs []document
	start, startLine, line := 0, 1, 1
	content := false
	flush := func(end int) {
		if content {
			docs = append(docs, document{index: len(docs) + 1, line: startLine, data: data[start:end]})
		}
	}
	for off := 0; off < len(data); line++ {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
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
	return docs
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

func (l *loader) addFile(name string, data []byte) {
	for _, doc := range splitDocuments(data) {
		where := fmt.Sprintf("%s: document %d", name, doc.index)
		j, err := yaml.YAMLToJSONStrict(doc.data)
		if err != nil {
			l.errs = append(l.errs, fmt.Errorf("%s: %w", where, syntaxError(err, doc.line)))
			continue
		}
		l.addObject(where, j)
	}
}

// addObject routes one JSON object by apiVersion and kind.
func (l *loader) addObject(where string, j []byte) {
	if isNull(j) {
		return
	}
	var h header
	if bytes.HasPrefix(bytes.TrimSpace(j), []byte("{")) {
		_ = json.Unmarshal(j, &h) // a non-string kind is just not ours
	}
	group, version, _ := strings.Cut(h.APIVersion, "/")
	if version == "" {
		group, version = "", group
	}
	var err error
	switch {
	case h.Kind == "List" && group == "" && version == "v1":
		err = l.addList(where, j)
	case group == "security.istio.io" && h.Kind == "PeerAuthentication":
		err = addKind(l, where, j, version, []string{"v1", "v1beta1"}, func(m meta, s *peerAuthSpec) error {
			p, err := compilePeerAuth(m, s)
			if err == nil {
				l.set.peerAuths = append(l.set.peerAuths, p)
			}
			return err
		})
	case group == "security.istio.io" && h.Kind == "AuthorizationPolicy":
		err = addKind(l, where, j, version, []string{"v1", "v1beta1"}, func(m meta, s *authzSpec) error {
			p, err := compileAuthz(m, s, l.td)
			if err == nil {
				l.set.authz = append(l.set.authz, p)
			}
			return err
		})
	case group == "networking.istio.io" && h.Kind == "DestinationRule":
		err = addKind(l, where, j, version, []string{"v1", "v1beta1", "v1alpha3"}, func(m meta, s *destRuleSpec) error {
			d, err := compileDestRule(m, s)
			if err == nil {
				l.set.dests = append(l.set.dests, d)
			}
			return err
		})
	default:
		l.log.Debug("policy: ignoring unsupported kind", "where", where, "apiVersion", h.APIVersion, "kind", h.Kind)
	}
	if err != nil {
		l.errs = append(l.errs, err)
	}
}

// addList loads the items of a kind: List (as `kubectl get -o yaml` writes).
func (l *loader) addList(where string, j []byte) error {
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(j, &list); err != nil {
		return fmt.Errorf("%s: items: want a list of objects", where)
	}
	for i, item := range list.Items {
		l.addObject(fmt.Sprintf("%s: items[%d]", where, i), item)
	}
	return nil
}

// addKind strictly decodes an object of a supported kind and hands it to add.
func addKind[S any](l *loader, where string, j []byte, version string, versions []string, add func(meta, *S) error) error {
	var obj object[S]
	// Decode first to learn the name for the error's "where".
	derr := decodeStrict("", j, &obj)
	m := meta{kind: obj.Kind, namespace: obj.Metadata.Namespace, name: obj.Metadata.Name, created: obj.Metadata.CreationTimestamp.Time}
	if m.namespace == "" {
		m.namespace = l.wlNamespace // as `kubectl apply` without -n puts it in the current namespace
	}
	if m.name != "" {
		where = fmt.Sprintf("%s (%s %s)", where, m.kind, m.id())
	}
	fail := func(err error) error { return fmt.Errorf("%s: %w", where, err) }
	if !slices.Contains(versions, version) {
		return fail(fieldErrorf("apiVersion", "%q: %s is read in versions %s", obj.APIVersion, m.kind, strings.Join(versions, ", ")))
	}
	if derr != nil {
		return fail(derr)
	}
	if m.name == "" {
		return fail(fieldErrorf("metadata.name", "required"))
	}
	if errs := validation.IsDNS1123Subdomain(m.name); len(errs) > 0 {
		return fail(fieldErrorf("metadata.name", "%q: %s", m.name, strings.Join(errs, "; ")))
	}
	if errs := validation.IsDNS1123Label(m.namespace); m.namespace != "" && len(errs) > 0 {
		return fail(fieldErrorf("metadata.namespace", "%q: %s", m.namespace, strings.Join(errs, "; ")))
	}
	key := m.kind + "/" + m.id()
	if first, dup := l.seen[key]; dup {
		return fail(fmt.Errorf("%s %s is defined twice (first in %s)", m.kind, m.id(), first))
	}
	l.seen[key] = where
	if err := add(m, &obj.Spec); err != nil {
		return fail(err)
	}
	return nil
}
