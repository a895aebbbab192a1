package policy

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxErrors bounds how many problems one strict load reports.
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

// docSet is the compiled content of a policy directory, not yet resolved
// for a workload: the applied documents and the fail-closed stand-ins of
// the rejected ones.
type docSet struct {
	peerAuths []*peerAuthPolicy
	authz     []*authzPolicy
	dests     []*destRule
}

// File is one configuration file: its name (as shown in messages) and
// content. A Kubernetes mirror passes one object per File with a name of
// its choice.
type File struct {
	Name string
	Data []byte
}

// Result is what became of one document.
type Result string

// Document results.
const (
	ResultApplied  Result = "applied"
	ResultWarned   Result = "warned"   // applied; some fields ignored or narrowed (see Messages)
	ResultDryRun   Result = "dry-run"  // an istio.io/dry-run AuthorizationPolicy: evaluated and counted, never enforced
	ResultRejected Result = "rejected" // not applied; fails closed for what it selects (see Messages)
)

// Message is one note about a document: the field at fault ("" for the
// whole document) and what was done about it.
type Message struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

// Document is the outcome of loading one document.
type Document struct {
	File      string    `json:"file"`
	Index     int       `json:"index"` // 1-based, in the file
	Kind      string    `json:"kind"`
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Result    Result    `json:"result"`
	Messages  []Message `json:"messages"`
	where     string
	dryRun    bool
	// failClosed, when set by a compiler, replaces the kind's own stand-in
	// for this rejected document.
	failClosed func()
}

// Where names the document as error messages do: "FILE: document N (Kind ns/name)".
func (d *Document) Where() string {
	if d.Name == "" {
		return d.where
	}
	return fmt.Sprintf("%s (%s %s/%s)", d.where, d.Kind, d.Namespace, d.Name)
}

// Err is the rejection as an error, "" fields left out; nil unless rejected.
func (d *Document) Err() error {
	if d.Result != ResultRejected {
		return nil
	}
	var parts []string
	for _, m := range d.Messages {
		if m.Field == "" {
			parts = append(parts, m.Message)
		} else {
			parts = append(parts, m.Field+": "+m.Message)
		}
	}
	return fmt.Errorf("%s: %s", d.Where(), strings.Join(parts, "; "))
}

// Config is the result of loading a set of files document by document.
type Config struct {
	// Documents has one entry per PeerAuthentication, AuthorizationPolicy
	// and DestinationRule document, and per document that could not be
	// read at all, in file order.
	Documents []Document
	// Ignored are the other objects (kinds the sidecar does not read).
	Ignored []Document
	set     docSet
}

// Rejected reports whether any document was rejected.
func (c *Config) Rejected() bool {
	for i := range c.Documents {
		if c.Documents[i].Result == ResultRejected {
			return true
		}
	}
	return false
}

// Err joins the rejections (at most maxErrors), nil when there are none.
func (c *Config) Err() error {
	var errs []error
	for i := range c.Documents {
		if err := c.Documents[i].Err(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > maxErrors {
		errs = append(errs[:maxErrors], fmt.Errorf("… and %d more errors", len(errs)-maxErrors))
	}
	return errors.Join(errs...)
}

// Load reads files document by document, as `meshproxy run --config-dir`
// does for workload wl (whose namespace is the default for documents
// without one): each document is applied, applied with warnings, or
// rejected alone, a rejected one failing closed for what it selects.
// Options set the trust domain and logger; the other options are for
// stores.
func Load(files []File, wl Workload, opts ...Option) *Config {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	return newLoader(wl.Namespace, o.td, o.log).load(files)
}

// NewSnapshot resolves cfg for workload wl (without DNS: DestinationRule
// names match nothing), for tools such as `meshproxy check`.
func NewSnapshot(cfg *Config, wl Workload, opts ...Option) *Snapshot {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	return buildSnapshot(1, cfg, wl, &o, nil)
}

// ReadDir returns the configuration files of dir as a Store reads them:
// *.yaml, *.yml and *.json, following the symlinks of a mounted ConfigMap,
// in name order.
func ReadDir(dir string) ([]File, error) { return readDir(dir) }

// readDir returns the policy files of dir (see manifest.ReadDir).
func readDir(dir string) ([]File, error) {
	mfiles, err := manifest.ReadDir(dir, "policy")
	if err != nil {
		return nil, err
	}
	files := make([]File, len(mfiles))
	for i, f := range mfiles {
		files[i] = File(f)
	}
	return files, nil
}

func manifestFiles(files []File) []manifest.File {
	mfiles := make([]manifest.File, len(files))
	for i, f := range files {
		mfiles[i] = manifest.File(f)
	}
	return mfiles
}

// hashFiles fingerprints a directory's content, to reload only on change.
func hashFiles(files []File) [sha256.Size]byte {
	return manifest.Hash(manifestFiles(files))
}

// loader parses and validates documents one by one.
type loader struct {
	wlNamespace string
	td          spiffeid.TrustDomain
	log         *slog.Logger
	cfg         Config
	pending     []pending
}

// pending is a document that compiled: it is applied once every document
// has been read, unless it clashes with another of the same name.
type pending struct {
	doc        int // index into cfg.Documents
	key        string
	spec       []byte // canonical JSON of the document's spec, to tell a harmless repeat from a clash
	apply      func()
	failClosed func()
}

func newLoader(wlNamespace string, td spiffeid.TrustDomain, log *slog.Logger) *loader {
	return &loader{wlNamespace: wlNamespace, td: td, log: log}
}

// load reads every document of files.
func (l *loader) load(files []File) *Config {
	for d, err := range manifest.Objects(manifestFiles(files)) {
		if err != nil {
			doc := Document{File: d.File, Index: d.Index, where: d.Where, Result: ResultRejected}
			doc.Messages = []Message{{Message: trimWhere(err, d.Where)}}
			l.cfg.Documents = append(l.cfg.Documents, doc)
			continue
		}
		l.addObject(d)
	}
	l.settle()
	return &l.cfg
}

// trimWhere drops the "FILE: document N" prefix an error already carries,
// since a Document names its place itself.
func trimWhere(err error, where string) string {
	msg := err.Error()
	if rest, ok := strings.CutPrefix(msg, where); ok {
		msg = strings.TrimPrefix(rest, ": ")
		if strings.HasPrefix(msg, "(") { // " (Kind ns/name): "
			if i := strings.Index(msg, "): "); i >= 0 {
				msg = msg[i+3:]
			}
		}
	}
	return msg
}

// fieldMessage splits a manifest.FieldError into field and message.
func fieldMessage(err error, where string) Message {
	var fe *manifest.FieldError
	if errors.As(err, &fe) {
		return Message{Field: fe.Path, Message: fe.Msg}
	}
	return Message{Message: trimWhere(err, where)}
}

// policyKind reports whether the policy loader reads this kind.
func policyKind(group, kind string) bool {
	switch {
	case group == "security.istio.io" && (kind == "PeerAuthentication" || kind == "AuthorizationPolicy"):
		return true
	case group == "networking.istio.io" && kind == "DestinationRule":
		return true
	}
	return false
}

// addObject routes one object by apiVersion and kind.
func (l *loader) addObject(d manifest.Doc) {
	group, _, kind := d.Kind()
	if !policyKind(group, kind) {
		apiVersion, _ := d.Header()
		l.log.Debug("policy: ignoring a kind the sidecar does not read", "where", d.Where, "apiVersion", apiVersion, "kind", kind)
		ns, name := looseName(d.JSON)
		l.cfg.Ignored = append(l.cfg.Ignored, Document{File: d.File, Index: d.Index, Kind: kind, Namespace: cmp.Or(ns, l.wlNamespace), Name: name, where: d.Where})
		return
	}
	switch kind {
	case "PeerAuthentication":
		addKind(l, d, []string{"v1", "v1beta1"}, func(m meta, s *peerAuthSpec, doc *Document, _ []byte) (func(), error) {
			p, err := compilePeerAuth(m, s, doc.warn)
			if err != nil {
				return nil, err
			}
			return func() { l.cfg.set.peerAuths = append(l.cfg.set.peerAuths, p) }, nil
		}, l.failPeerAuth)
	case "AuthorizationPolicy":
		addKind(l, d, []string{"v1", "v1beta1"}, l.compileAuthzDoc, l.failAuthz)
	case "DestinationRule":
		addKind(l, d, []string{"v1", "v1beta1", "v1alpha3"}, func(m meta, s *destRuleSpec, doc *Document, _ []byte) (func(), error) {
			dr, err := compileDestRule(m, s, doc.warn)
			if err != nil {
				return nil, err
			}
			return func() { l.cfg.set.dests = append(l.cfg.set.dests, dr) }, nil
		}, l.failDestRule)
	}
}

func (d *Document) warn(field, format string, args ...any) {
	d.Messages = append(d.Messages, Message{Field: field, Message: fmt.Sprintf(format, args...)})
}

// compileAuthzDoc compiles an AuthorizationPolicy, honouring istio.io/dry-run.
func (l *loader) compileAuthzDoc(m meta, s *authzSpec, doc *Document, raw []byte) (func(), error) {
	p, err := compileAuthz(m, s, l.td, doc.warn)
	if errors.Is(err, errCustom) {
		// Rejected, but what its rules cover is denied (fail closed).
		doc.failClosed = func() { l.cfg.set.authz = append(l.cfg.set.authz, p) }
		p.failClosed = err.Error()
		return nil, err
	}
	if err != nil {
		return nil, err
	}
	p.dryRun = dryRunOf(raw, doc)
	if p.dryRun && p.action == actionAudit {
		p.dryRun = false
	}
	if p.dryRun {
		doc.dryRun = true
	}
	return func() { l.cfg.set.authz = append(l.cfg.set.authz, p) }, nil
}

// dryRunOf reads the istio.io/dry-run annotation as Istio does
// (strconv.ParseBool); a value that is not a boolean leaves the policy
// enforced, with a warning.
func dryRunOf(raw []byte, doc *Document) bool {
	v, ok := looseAnnotation(raw, "istio.io/dry-run")
	if !ok {
		return false
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		doc.warn("metadata.annotations[istio.io/dry-run]", "%q is not a boolean; the policy is enforced (as in Istio)", v)
		return false
	}
	return b
}

// addKind strictly decodes an object of a supported kind (see
// manifest.DecodeObject), compiles it with compile, and records the
// outcome; failClosed stands in for a rejected document.
func addKind[S any](l *loader, d manifest.Doc, versions []string, compile func(meta, *S, *Document, []byte) (func(), error), failClosed func(manifest.Doc, *Document)) {
	doc := Document{File: d.File, Index: d.Index, where: d.Where, Result: ResultApplied}
	_, _, doc.Kind = d.Kind()
	ns, name := looseName(d.JSON)
	doc.Namespace, doc.Name = cmp.Or(ns, l.wlNamespace), name
	i := len(l.cfg.Documents)
	reject := func(err error) {
		l.cfg.Documents = append(l.cfg.Documents, doc)
		l.reject(i, fieldMessage(err, d.Where), func() { failClosed(d, &l.cfg.Documents[i]) })
	}
	// No namespace: the workload's, as `kubectl apply` without -n does.
	obj, err := manifest.DecodeObject[S](d, versions, l.wlNamespace)
	if err != nil {
		reject(err)
		return
	}
	m := meta{kind: obj.Kind, namespace: obj.Metadata.Namespace, name: obj.Metadata.Name, created: obj.Metadata.CreationTimestamp.Time}
	doc.Namespace, doc.Name = m.namespace, m.name
	apply, err := compile(m, &obj.Spec, &doc, d.JSON)
	if err != nil {
		custom := doc.failClosed
		l.cfg.Documents = append(l.cfg.Documents, doc)
		fc := func() { failClosed(d, &l.cfg.Documents[i]) }
		if custom != nil {
			fc = custom
		}
		l.reject(i, fieldMessage(err, d.Where), fc)
		return
	}
	spec, _ := json.Marshal(obj.Spec)
	l.cfg.Documents = append(l.cfg.Documents, doc)
	l.pending = append(l.pending, pending{
		doc: i, key: m.kind + "/" + m.id(), spec: spec, apply: apply,
		failClosed: func() { failClosed(d, &l.cfg.Documents[i]) },
	})
}

// reject marks document i rejected with msg, logs it, and applies its
// fail-closed stand-in.
func (l *loader) reject(i int, msg Message, failClosed func()) {
	doc := &l.cfg.Documents[i]
	doc.Result = ResultRejected
	doc.Messages = append(doc.Messages, msg)
	l.log.Error("policy: document rejected; it fails closed and the others apply", "where", doc.Where(), "field", msg.Field, "reason", msg.Message)
	failClosed()
}

// settle applies the pending documents. Two documents with the same kind,
// namespace and name (after namespace-less ones took the workload's
// namespace) clash unless their specs are identical: both are rejected.
func (l *loader) settle() {
	byKey := map[string][]int{}
	var order []string
	for i, p := range l.pending {
		if _, ok := byKey[p.key]; !ok {
			order = append(order, p.key)
		}
		byKey[p.key] = append(byKey[p.key], i)
	}
	for _, key := range order {
		idx := byKey[key]
		first := l.pending[idx[0]]
		same := true
		for _, j := range idx[1:] {
			same = same && bytes.Equal(l.pending[j].spec, first.spec)
		}
		switch {
		case len(idx) == 1:
			l.finish(first)
		case same:
			l.finish(first)
			for _, j := range idx[1:] {
				doc := &l.cfg.Documents[l.pending[j].doc]
				doc.warn("metadata.name", "repeats %s with the same spec; applied once", l.cfg.Documents[first.doc].Where())
				doc.Result = ResultWarned
			}
		default:
			for _, j := range idx {
				var others []string
				for _, k := range idx {
					if k != j {
						others = append(others, l.cfg.Documents[l.pending[k].doc].Where())
					}
				}
				p := l.pending[j]
				l.reject(p.doc, Message{Field: "metadata.name", Message: fmt.Sprintf(
					"%s is also defined, differently, in %s; both are rejected", strings.TrimPrefix(key, l.cfg.Documents[p.doc].Kind+"/"), strings.Join(others, ", "))}, p.failClosed)
			}
		}
	}
	for i := range l.cfg.Documents {
		doc := &l.cfg.Documents[i]
		switch {
		case doc.Result == ResultRejected:
		case doc.dryRun:
			doc.Result = ResultDryRun
		case len(doc.Messages) > 0:
			doc.Result = ResultWarned
		}
		if doc.Result == ResultWarned || doc.Result == ResultDryRun {
			for _, m := range doc.Messages {
				l.log.Warn("policy: document applied with a warning", "where", doc.Where(), "result", string(doc.Result), "field", m.Field, "reason", m.Message)
			}
		}
	}
}

func (l *loader) finish(p pending) { p.apply() }

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

// countDocuments sets meshproxy_config_documents to the results of one load.
func countDocuments(docs []Document) {
	counts := map[[2]string]float64{}
	for _, k := range []string{"PeerAuthentication", "AuthorizationPolicy", "DestinationRule", ""} {
		for _, r := range []Result{ResultApplied, ResultWarned, ResultDryRun, ResultRejected} {
			counts[[2]string{k, string(r)}] = 0
		}
	}
	for _, d := range docs {
		counts[[2]string{d.Kind, string(d.Result)}]++
	}
	for k, n := range counts {
		metrics.ConfigDocuments.WithLabelValues(cmp.Or(k[0], "unknown"), strings.ReplaceAll(k[1], "-", "_")).Set(n)
	}
}
