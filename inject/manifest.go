//go:build !noinject

package inject

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// object is a decoded JSON/YAML mapping; numbers are json.Number so they
// come back out exactly as they went in.
type object = map[string]any

// fieldError is a DocumentError before the document is known.
type fieldError struct {
	object, field string
	err           error
}

func (e *fieldError) Error() string { return e.field + ": " + e.err.Error() }

// Manifest injects into every workload of a multi-document YAML manifest
// and returns the new manifest and what happened to each workload.
func (in *Injector) Manifest(src []byte) ([]byte, []Result, error) {
	var (
		out     bytes.Buffer
		results []Result
		index   int
	)
	for _, d := range splitDocuments(src) {
		out.Write(d.sep)
		body, counted, err := in.document(d, index+1, &results)
		if counted {
			index++
		}
		if err != nil {
			return nil, results, err
		}
		out.Write(body)
	}
	return out.Bytes(), results, nil
}

// document injects into one document and returns its new body, or the
// original bytes when nothing changed.
func (in *Injector) document(d document, index int, results *[]Result) ([]byte, bool, error) {
	docErr := func(err error) error {
		de := &DocumentError{Document: index, Line: d.line, Err: err}
		if fe, ok := errors.AsType[*fieldError](err); ok {
			de.Object, de.Field, de.Err = fe.object, fe.field, fe.err
		}
		return de
	}
	raw, err := yaml.YAMLToJSONStrict(d.body)
	if err != nil {
		return nil, true, docErr(errors.New(absoluteLines(err.Error(), d.line)))
	}
	if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return d.body, false, nil // only comments or blank lines
	}
	var v any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&v); err != nil {
		return nil, true, docErr(fmt.Errorf("decode: %w", err))
	}
	obj, ok := v.(object)
	if !ok {
		return nil, true, docErr(errors.New("not a Kubernetes object (want a YAML mapping with apiVersion and kind)"))
	}
	var errs []error
	changed, err := in.object(obj, raw, "", func(r Result) {
		r.Document = index
		*results = append(*results, r)
	})
	if err != nil {
		for _, e := range flatten(err) {
			errs = append(errs, docErr(e))
		}
		return nil, true, errors.Join(errs...)
	}
	if !changed {
		return d.body, true, nil
	}
	body, err := yaml.Marshal(obj)
	if err != nil {
		return nil, true, docErr(fmt.Errorf("encode: %w", err))
	}
	return append(leadingComments(d.body), body...), true, nil
}

// object injects into obj (decoded from raw) and, for a List, its items.
// field is obj's path in the document ("" or "items[3].").
func (in *Injector) object(obj object, raw []byte, field string, record func(Result)) (bool, error) {
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	if apiVersion == "" {
		return false, &fieldError{field: field + "apiVersion", err: errors.New("missing or not a string")}
	}
	if kind == "" {
		return false, &fieldError{field: field + "kind", err: errors.New("missing or not a string")}
	}
	desc := describe(obj)
	fail := func(err error) error {
		var out []error
		for _, e := range flatten(err) {
			fe, ok := e.(*fieldError)
			if !ok {
				fe = &fieldError{err: e}
			}
			if fe.object == "" {
				fe.object = desc
			}
			out = append(out, fe)
		}
		return errors.Join(out...)
	}
	if kind == "List" && apiVersion == "v1" {
		changed, err := in.list(obj, raw, field, record)
		if err != nil {
			return false, fail(err)
		}
		return changed, nil
	}
	w, ok := workloads[kind]
	if !ok {
		return false, nil
	}
	if apiVersion != w.apiVersion {
		return false, fail(&fieldError{field: field + "apiVersion",
			err: fmt.Errorf("%s %s is not supported (want %s)", apiVersion, kind, w.apiVersion)})
	}
	meta, spec, err := w.decode(raw, field)
	if err != nil {
		return false, fail(err)
	}
	path := strings.TrimSuffix(field, ".")
	if reason := skipReason(meta.Annotations, meta.Labels, spec); reason != "" {
		record(Result{Path: path, Object: desc, Reason: reason})
		return false, nil
	}
	tmpl := obj
	for _, key := range w.template {
		if tmpl, err = childMap(tmpl, key, field); err != nil {
			return false, fail(err)
		}
	}
	if err := in.cfg.podTemplate(tmpl, field+w.templateField()); err != nil {
		return false, fail(err)
	}
	record(Result{Path: path, Object: desc, Injected: true})
	return true, nil
}

// list injects into the items of a kind: List.
func (in *Injector) list(obj object, raw []byte, field string, record func(Result)) (bool, error) {
	var l struct {
		APIVersion string            `json:"apiVersion"`
		Kind       string            `json:"kind"`
		Metadata   metav1.ListMeta   `json:"metadata"`
		Items      []json.RawMessage `json:"items"`
	}
	if err := strictDecode(raw, &l, field); err != nil {
		return false, err
	}
	items := listAt(obj, "items")
	changed := false
	for i, itemRaw := range l.Items {
		itemField := fmt.Sprintf("%sitems[%d]", field, i)
		item, ok := items[i].(object)
		if !ok {
			return false, &fieldError{field: itemField, err: errors.New("not an object")}
		}
		c, err := in.object(item, itemRaw, itemField+".", record)
		if err != nil {
			return false, err
		}
		changed = changed || c
	}
	return changed, nil
}

// workload is a kind with a pod template.
type workload struct {
	apiVersion string
	template   []string // path to the pod template; empty for a Pod
	decode     func(raw []byte, field string) (*metav1.ObjectMeta, *corev1.PodSpec, error)
}

func (w workload) templateField() string {
	if len(w.template) == 0 {
		return ""
	}
	return strings.Join(w.template, ".") + "."
}

// decodeAs strictly decodes raw into a T and picks its pod template.
func decodeAs[T any](pick func(*T) (*metav1.ObjectMeta, *corev1.PodSpec)) func([]byte, string) (*metav1.ObjectMeta, *corev1.PodSpec, error) {
	return func(raw []byte, field string) (*metav1.ObjectMeta, *corev1.PodSpec, error) {
		var v T
		if err := strictDecode(raw, &v, field); err != nil {
			return nil, nil, err
		}
		m, s := pick(&v)
		return m, s, nil
	}
}

func tmplOf(t *corev1.PodTemplateSpec) (*metav1.ObjectMeta, *corev1.PodSpec) {
	return &t.ObjectMeta, &t.Spec
}

// workloads are the kinds injection changes, by kind.
var workloads = map[string]workload{
	"Pod": {"v1", nil, decodeAs(func(p *corev1.Pod) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return &p.ObjectMeta, &p.Spec
	})},
	"ReplicationController": {"v1", []string{"spec", "template"}, decodeAs(func(r *corev1.ReplicationController) (*metav1.ObjectMeta, *corev1.PodSpec) {
		if r.Spec.Template == nil {
			r.Spec.Template = &corev1.PodTemplateSpec{}
		}
		return tmplOf(r.Spec.Template)
	})},
	"Deployment": {"apps/v1", []string{"spec", "template"}, decodeAs(func(d *appsv1.Deployment) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&d.Spec.Template)
	})},
	"StatefulSet": {"apps/v1", []string{"spec", "template"}, decodeAs(func(s *appsv1.StatefulSet) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&s.Spec.Template)
	})},
	"DaemonSet": {"apps/v1", []string{"spec", "template"}, decodeAs(func(d *appsv1.DaemonSet) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&d.Spec.Template)
	})},
	"ReplicaSet": {"apps/v1", []string{"spec", "template"}, decodeAs(func(r *appsv1.ReplicaSet) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&r.Spec.Template)
	})},
	"Job": {"batch/v1", []string{"spec", "template"}, decodeAs(func(j *batchv1.Job) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&j.Spec.Template)
	})},
	"CronJob": {"batch/v1", []string{"spec", "jobTemplate", "spec", "template"}, decodeAs(func(c *batchv1.CronJob) (*metav1.ObjectMeta, *corev1.PodSpec) {
		return tmplOf(&c.Spec.JobTemplate.Spec.Template)
	})},
}

var (
	strictFieldRe = regexp.MustCompile(`^(unknown|duplicate) field "(.*)"$`)
	typeErrRe     = regexp.MustCompile(`^json: cannot unmarshal (\S+) into Go struct field [^.\s]+\.(\S+) of type (\S+)$`)
	lineRe        = regexp.MustCompile(`\bline (\d+)\b`)
)

// strictDecode decodes JSON into v as the API server would with
// fieldValidation=Strict: unknown and duplicate fields and wrong types are
// errors naming the field (prefixed with field).
func strictDecode(raw []byte, v any, field string) error {
	strictErrs, err := kjson.UnmarshalStrict(raw, v)
	if err != nil {
		if m := typeErrRe.FindStringSubmatch(err.Error()); m != nil {
			return &fieldError{field: field + m[2], err: fmt.Errorf("cannot decode a %s into %s", m[1], m[3])}
		}
		return &fieldError{field: strings.TrimSuffix(field, "."), err: err}
	}
	var errs []error
	for _, e := range strictErrs {
		if m := strictFieldRe.FindStringSubmatch(e.Error()); m != nil {
			errs = append(errs, &fieldError{field: field + m[2], err: errors.New(m[1] + " field")})
			continue
		}
		errs = append(errs, &fieldError{field: strings.TrimSuffix(field, "."), err: e})
	}
	return errors.Join(errs...)
}

// flatten undoes errors.Join.
func flatten(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	return []error{err}
}

// childMap returns m[key] as an object, creating it when absent or null.
func childMap(m object, key, field string) (object, error) {
	switch v := m[key].(type) {
	case object:
		return v, nil
	case nil:
		c := object{}
		m[key] = c
		return c, nil
	default:
		return nil, &fieldError{field: field + key, err: fmt.Errorf("want an object, have %T", v)}
	}
}

// toGeneric turns a typed value into its generic JSON form.
func toGeneric(v any) (object, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var o object
	if err := dec.Decode(&o); err != nil {
		return nil, fmt.Errorf("decode %T: %w", v, err)
	}
	return o, nil
}

// describe names an object as "Kind namespace/name".
func describe(obj object) string {
	kind, _ := obj["kind"].(string)
	meta, _ := obj["metadata"].(object)
	name, _ := meta["name"].(string)
	if name == "" {
		if g, _ := meta["generateName"].(string); g != "" {
			name = g + "*"
		}
	}
	if ns, _ := meta["namespace"].(string); ns != "" && name != "" {
		name = ns + "/" + name
	}
	return strings.TrimSpace(kind + " " + name)
}

// document is one YAML document of a stream and the separator line before it.
type document struct {
	sep  []byte // "---" line (with its comment and line ending); nil for the first
	body []byte
	line int // input line of body's first line
}

// splitDocuments splits a YAML stream at lines that are "---", optionally
// followed by blanks or a comment, keeping every byte.
func splitDocuments(src []byte) []document {
	docs := []document{{line: 1}}
	for n := 1; len(src) > 0; n++ {
		var l []byte
		if i := bytes.IndexByte(src, '\n'); i >= 0 {
			l, src = src[:i+1], src[i+1:]
		} else {
			l, src = src, nil
		}
		if isSeparator(l) {
			docs = append(docs, document{sep: l, line: n + 1})
			continue
		}
		d := &docs[len(docs)-1]
		d.body = append(d.body, l...)
	}
	return docs
}

func isSeparator(l []byte) bool {
	l = bytes.TrimRight(l, "\r\n")
	rest, ok := bytes.CutPrefix(l, []byte("---"))
	if !ok {
		return false
	}
	rest = bytes.TrimSpace(rest)
	return len(rest) == 0 || rest[0] == '#'
}

// leadingComments returns the comment and blank lines a document starts
// with, kept when the rest of it is rewritten.
func leadingComments(body []byte) []byte {
	end := 0
	for rest := body; len(rest) > 0; {
		l := rest
		if i := bytes.IndexByte(rest, '\n'); i >= 0 {
			l = rest[:i+1]
		}
		t := bytes.TrimSpace(l)
		if len(t) > 0 && t[0] != '#' {
			break
		}
		end += len(l)
		rest = rest[len(l):]
	}
	return bytes.Clone(body[:end])
}

// absoluteLines rewrites "line N" of a per-document YAML error into the
// line of the whole input.
func absoluteLines(msg string, start int) string {
	return lineRe.ReplaceAllStringFunc(msg, func(s string) string {
		n, err := strconv.Atoi(strings.TrimPrefix(s, "line "))
		if err != nil {
			return s
		}
		return "line " + strconv.Itoa(n+start-1)
	})
}
