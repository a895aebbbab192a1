package mirror

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshproxy/meshproxy/metrics"
)

// Retry bounds after a failed list or watch.
const (
	minRetry = 500 * time.Millisecond
	maxRetry = 30 * time.Second
)

// Mirror is an in-memory copy of the Istio resources of the cluster,
// kept current by list and watch. Its version grows with every change.
type Mirror struct {
	api  Doer
	log  *slog.Logger
	res  []Resource
	wait func(ctx context.Context, d time.Duration) error

	mu      sync.Mutex
	objs    map[objectKey]Document
	synced  []bool  // per resource: listed at least once
	errs    []error // per resource: the last failure, nil once it recovered
	version uint64
	changed chan struct{} // closed and replaced on every change
}

// Document is one mirrored object, cleaned of server-side metadata.
type Document struct {
	Kind, Namespace, Name string
	JSON                  json.RawMessage
}

type objectKey struct {
	res             int
	namespace, name string
}

// Option configures a Mirror.
type Option func(*Mirror)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(m *Mirror) { m.log = l } }

// WithResources restricts the mirror to rs (default Resources).
func WithResources(rs ...Resource) Option { return func(m *Mirror) { m.res = rs } }

// New returns a mirror reading from api; Run keeps it current.
func New(api Doer, opts ...Option) *Mirror {
	m := &Mirror{api: api, log: slog.Default(), res: Resources, objs: map[objectKey]Document{}, changed: make(chan struct{}), wait: sleep,
		// Versions start from the clock, so a client's version from before a
		// CA restart does not match the restarted mirror's by chance.
		version: uint64(time.Now().UnixNano())}
	for _, o := range opts {
		o(m)
	}
	m.synced, m.errs = make([]bool, len(m.res)), make([]error, len(m.res))
	for _, r := range m.res {
		metrics.MirrorObjects.WithLabelValues(r.Plural).Set(0)
	}
	return m
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Run lists and watches every resource until ctx ends; it returns nil then.
// Failures are logged, counted, and retried with backoff; Ready reports them.
func (m *Mirror) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	for i := range m.res {
		wg.Go(func() { m.follow(ctx, i) })
	}
	wg.Wait()
	return nil
}

// follow keeps resource i current: list, then watch from the list's
// version, resuming after a stream ends and listing again when the version
// is gone or a call failed.
func (m *Mirror) follow(ctx context.Context, i int) {
	r := m.res[i]
	backoff := minRetry
	for ctx.Err() == nil {
		items, rv, err := list(ctx, m.api, r)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, ErrNotInstalled) {
				m.replace(i, nil) // no CRD, no objects: synced, and keep looking for it
			}
			m.fail(i, err)
			if m.wait(ctx, jitter(backoff)) != nil {
				return
			}
			backoff = min(2*backoff, maxRetry)
			continue
		}
		m.replace(i, items)
		// The backoff resets only once a watch works, so a role that allows
		// list but not watch does not make the mirror list in a tight loop.
		for ctx.Err() == nil {
			progressed := false
			err := watch(ctx, m.api, r, &rv, func(typ string, obj json.RawMessage) error {
				progressed = true
				return m.apply(i, typ, obj)
			})
			if err == nil || progressed {
				backoff = minRetry
			}
			if err == nil {
				continue // the server ended the stream: resume from rv
			}
			if ctx.Err() != nil {
				return
			}
			if !errors.Is(err, errGone) {
				m.fail(i, err)
				if m.wait(ctx, jitter(backoff)) != nil {
					return
				}
				backoff = min(2*backoff, maxRetry)
			}
			break // list again
		}
	}
}

func jitter(d time.Duration) time.Duration { return d/2 + mrand.N(d/2+1) }

// fail records and reports a failed call for resource i.
func (m *Mirror) fail(i int, err error) {
	r := m.res[i]
	reason := "unavailable"
	switch {
	case errors.Is(err, ErrForbidden):
		reason = "forbidden"
	case errors.Is(err, ErrNotInstalled):
		reason = "not_found"
	case strings.Contains(err.Error(), "bad response") || strings.Contains(err.Error(), "bad object"):
		reason = "bad_response"
	}
	metrics.MirrorSyncErrors.WithLabelValues(r.Plural, reason).Inc()
	m.mu.Lock()
	m.errs[i] = err
	m.mu.Unlock()
	if errors.Is(err, ErrNotInstalled) {
		m.log.Warn("istio config mirror: resource not installed; mirroring none of it", "resource", r.Name(), "err", err)
		return
	}
	m.log.Error("istio config mirror: sync failed; retrying", "resource", r.Name(), "reason", reason, "err", err)
}

// replace sets every object of resource i from a list.
func (m *Mirror) replace(i int, items []json.RawMessage) {
	fresh := map[objectKey]Document{}
	for _, raw := range items {
		d, err := clean(m.res[i], raw)
		if err != nil {
			metrics.MirrorSyncErrors.WithLabelValues(m.res[i].Plural, "bad_response").Inc()
			m.log.Error("istio config mirror: skipping object", "resource", m.res[i].Name(), "err", err)
			continue
		}
		fresh[objectKey{i, d.Namespace, d.Name}] = d
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	old := map[objectKey]Document{}
	for k, d := range m.objs {
		if k.res == i {
			old[k] = d
			delete(m.objs, k)
		}
	}
	maps.Copy(m.objs, fresh)
	diff := !m.synced[i] || !maps.EqualFunc(old, fresh, func(a, b Document) bool { return bytes.Equal(a.JSON, b.JSON) })
	wasSynced := m.synced[i]
	m.synced[i], m.errs[i] = true, nil
	if diff {
		m.bumpLocked()
	}
	metrics.MirrorObjects.WithLabelValues(m.res[i].Plural).Set(float64(len(fresh)))
	if !wasSynced {
		m.log.Info("istio config mirror: listed", "resource", m.res[i].Name(), "objects", len(fresh))
	}
}

func (m *Mirror) countLocked(i int) int {
	n := 0
	for k := range m.objs {
		if k.res == i {
			n++
		}
	}
	return n
}

// apply applies one watch event to resource i.
func (m *Mirror) apply(i int, typ string, raw json.RawMessage) error {
	d, err := clean(m.res[i], raw)
	if err != nil {
		return err
	}
	k := objectKey{i, d.Namespace, d.Name}
	m.mu.Lock()
	defer m.mu.Unlock()
	old, had := m.objs[k]
	switch typ {
	case "DELETED":
		if !had {
			return nil
		}
		delete(m.objs, k)
	default:
		if had && bytes.Equal(old.JSON, d.JSON) {
			return nil // status or metadata-only change: nothing a sidecar reads
		}
		m.objs[k] = d
	}
	m.errs[i] = nil
	m.bumpLocked()
	metrics.MirrorObjects.WithLabelValues(m.res[i].Plural).Set(float64(m.countLocked(i)))
	m.log.Debug("istio config mirror: changed", "event", typ, "kind", d.Kind, "namespace", d.Namespace, "name", d.Name, "version", m.version)
	return nil
}

func (m *Mirror) bumpLocked() {
	m.version++
	close(m.changed)
	m.changed = make(chan struct{})
}

// rawObject is the part of an object the mirror keeps.
type rawObject struct {
	Metadata struct {
		Name              string            `json:"name"`
		Namespace         string            `json:"namespace"`
		CreationTimestamp string            `json:"creationTimestamp,omitempty"`
		Labels            map[string]string `json:"labels,omitempty"`
		Annotations       map[string]string `json:"annotations,omitempty"`
	} `json:"metadata"`
	Spec json.RawMessage `json:"spec"`
}

// cleanObject is what is served: apiVersion and kind of the mirrored
// version, the metadata the policy loaders read, and the spec as stored.
type cleanObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   any    `json:"metadata"`
	Spec       any    `json:"spec,omitempty"`
}

// clean keeps name, namespace, creationTimestamp (Istio's tie-break),
// labels and annotations (istio.io/dry-run) and the spec; server-side
// fields (uid, resourceVersion, managedFields, status) and kubectl's
// last-applied copy are dropped.
func clean(r Resource, raw json.RawMessage) (Document, error) {
	var o rawObject
	if err := json.Unmarshal(raw, &o); err != nil {
		return Document{}, fmt.Errorf("bad object: %w", err)
	}
	md := o.Metadata
	if errs := validation.IsDNS1123Subdomain(md.Name); len(errs) > 0 {
		return Document{}, fmt.Errorf("bad object: %s name %q: %s", r.Kind, md.Name, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Label(md.Namespace); len(errs) > 0 {
		return Document{}, fmt.Errorf("bad object: %s %s namespace %q: %s", r.Kind, md.Name, md.Namespace, strings.Join(errs, "; "))
	}
	delete(md.Annotations, "kubectl.kubernetes.io/last-applied-configuration")
	if len(md.Annotations) == 0 {
		md.Annotations = nil
	}
	out := cleanObject{APIVersion: r.APIVersion(), Kind: r.Kind, Metadata: md}
	if len(o.Spec) > 0 && string(o.Spec) != "null" {
		out.Spec = o.Spec
	}
	b, err := json.Marshal(out)
	if err != nil {
		return Document{}, fmt.Errorf("bad object: %w", err)
	}
	return Document{Kind: r.Kind, Namespace: md.Namespace, Name: md.Name, JSON: b}, nil
}

// ErrNotReady wraps the reason the mirror cannot serve yet.
var ErrNotReady = errors.New("istio config mirror not synced")

// View is the state of the mirror at one version.
type View struct {
	Version uint64
	// Changed is closed when a newer version exists.
	Changed <-chan struct{}
	// Err is non-nil (wrapping ErrNotReady) until every resource has been
	// listed once; it names the resources and their last failures.
	Err error
}

// Current is the mirror's version, its change signal and readiness.
func (m *Mirror) Current() View {
	m.mu.Lock()
	defer m.mu.Unlock()
	v := View{Version: m.version, Changed: m.changed}
	var missing []string
	for i, ok := range m.synced {
		if ok {
			continue
		}
		s := m.res[i].Name()
		if m.errs[i] != nil {
			s += ": " + m.errs[i].Error()
		}
		missing = append(missing, s)
	}
	if len(missing) > 0 {
		v.Err = fmt.Errorf("%w: waiting for %s", ErrNotReady, strings.Join(missing, "; "))
	}
	return v
}

// Documents returns the objects of the given namespaces, ordered by kind,
// namespace and name, and the version they belong to.
func (m *Mirror) Documents(namespaces ...string) ([]Document, uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []Document
	for _, d := range m.objs {
		if slices.Contains(namespaces, d.Namespace) {
			out = append(out, d)
		}
	}
	slices.SortFunc(out, func(a, b Document) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out, m.version
}
