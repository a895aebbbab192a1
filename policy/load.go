package policy

import (
	"cmp"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxErrors bounds how many problems one load reports.
const maxErrors = 20

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

// readDir returns the policy files of dir (see manifest.ReadDir).
func readDir(dir string) ([]file, error) {
	mfiles, err := manifest.ReadDir(dir, "policy")
	if err != nil {
		return nil, err
	}
	files := make([]file, len(mfiles))
	for i, f := range mfiles {
		files[i] = file{name: f.Name, data: f.Data}
	}
	return files, nil
}

func manifestFiles(files []file) []manifest.File {
	mfiles := make([]manifest.File, len(files))
	for i, f := range files {
		mfiles[i] = manifest.File{Name: f.name, Data: f.data}
	}
	return mfiles
}

// hashFiles fingerprints a directory's content, to reload only on change.
func hashFiles(files []file) [sha256.Size]byte {
	return manifest.Hash(manifestFiles(files))
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
	for d, err := range manifest.Objects(manifestFiles(files)) {
		if err != nil {
			l.errs = append(l.errs, err)
			continue
		}
		l.addObject(d)
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

// splitDocuments splits a YAML stream as the loader does (manifest.Split).
func splitDocuments(data []byte) []document {
	var docs []document
	for _, p := range manifest.Split(data) {
		docs = append(docs, document{index: p.Index, line: p.Line, data: p.Data})
	}
	return docs
}

// addObject routes one object by apiVersion and kind.
func (l *loader) addObject(d manifest.Doc) {
	group, _, kind := d.Kind()
	var err error
	switch {
	case group == "security.istio.io" && kind == "PeerAuthentication":
		err = addKind(l, d, []string{"v1", "v1beta1"}, func(m meta, s *peerAuthSpec) error {
			p, err := compilePeerAuth(m, s)
			if err == nil {
				l.set.peerAuths = append(l.set.peerAuths, p)
			}
			return err
		})
	case group == "security.istio.io" && kind == "AuthorizationPolicy":
		err = addKind(l, d, []string{"v1", "v1beta1"}, func(m meta, s *authzSpec) error {
			p, err := compileAuthz(m, s, l.td)
			if err == nil {
				l.set.authz = append(l.set.authz, p)
			}
			return err
		})
	case group == "networking.istio.io" && kind == "DestinationRule":
		err = addKind(l, d, []string{"v1", "v1beta1", "v1alpha3"}, func(m meta, s *destRuleSpec) error {
			dr, err := compileDestRule(m, s)
			if err == nil {
				l.set.dests = append(l.set.dests, dr)
			}
			return err
		})
	default:
		apiVersion, _ := d.Header()
		l.log.Debug("policy: ignoring unsupported kind", "where", d.Where, "apiVersion", apiVersion, "kind", kind)
	}
	if err != nil {
		l.errs = append(l.errs, err)
	}
}

// addKind strictly decodes an object of a supported kind (see
// manifest.DecodeObject) and hands it to add.
func addKind[S any](l *loader, d manifest.Doc, versions []string, add func(meta, *S) error) error {
	// No namespace: the workload's, as `kubectl apply` without -n does.
	obj, err := manifest.DecodeObject[S](d, versions, l.wlNamespace)
	if err != nil {
		return err
	}
	m := meta{kind: obj.Kind, namespace: obj.Metadata.Namespace, name: obj.Metadata.Name, created: obj.Metadata.CreationTimestamp.Time}
	where := d.Named(m.kind, m.id())
	fail := func(err error) error { return fmt.Errorf("%s: %w", where, err) }
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
