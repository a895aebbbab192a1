package policy

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshproxy/meshproxy/internal/watch"
	"github.com/meshproxy/meshproxy/metrics"
)

const (
	// resolveTimeout bounds one round of DestinationRule name resolution.
	resolveTimeout = 5 * time.Second
	// settleDelay lets a burst of fsnotify events (a ConfigMap swap is several) finish.
	settleDelay = 100 * time.Millisecond
)

func newStore(dir string, wl Workload, opts []Option) *Store {
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	return &Store{dir: dir, wl: Workload{Namespace: wl.Namespace, Labels: maps.Clone(wl.Labels)}, opts: o}
}

// NewStore loads the policy directory dir for workload wl. An error names the
// file, document, and line or field at fault; no Store is returned then.
func NewStore(dir string, wl Workload, opts ...Option) (*Store, error) {
	if dir == "" {
		return nil, errors.New("policy dir: empty path")
	}
	if err := validateWorkload(wl); err != nil {
		return nil, err
	}
	st, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("policy dir: %w", err)
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("policy dir %s: not a directory", dir)
	}
	s := newStore(dir, wl, opts)
	ctx, cancel := context.WithTimeout(context.Background(), 2*resolveTimeout)
	defer cancel()
	if err := s.reload(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

// Static returns a store with no directory: only the defaults (WithDefaultMode)
// apply. Its Run only waits for the context.
func Static(wl Workload, opts ...Option) *Store {
	s := newStore("", wl, opts)
	s.docs = &Config{}
	s.cur.Store(buildSnapshot(1, s.docs, s.wl, &s.opts, nil))
	return s
}

func validateWorkload(wl Workload) error {
	if wl.Namespace != "" {
		if errs := validation.IsDNS1123Label(wl.Namespace); len(errs) > 0 {
			return fmt.Errorf("workload namespace %q: %s", wl.Namespace, strings.Join(errs, "; "))
		}
	}
	return nil
}

// reload reads the directory and, if its content changed, validates it and
// publishes a new snapshot. A failure keeps the current snapshot; it is
// counted and logged once per distinct bad content.
func (s *Store) reload(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	files, err := readDir(s.dir)
	var sum [sha256.Size]byte
	if err != nil {
		sum = sha256.Sum256([]byte(err.Error()))
	} else {
		sum = hashFiles(files)
	}
	switch {
	case s.docs != nil && err == nil && sum == s.hash:
		s.failed, s.failedErr = [sha256.Size]byte{}, nil // back to good: the same bad content again is news
		return nil
	case sum == s.failed:
		return s.failedErr
	}
	if err == nil {
		cfg := newLoader(s.wl.Namespace, s.opts.td, s.opts.log).load(files)
		if err = cfg.Err(); err == nil || !s.opts.strict {
			s.publish(cfg, s.resolve(ctx, &cfg.set))
			s.docs, s.hash, s.failed, s.failedErr = cfg, sum, [sha256.Size]byte{}, nil
			countDocuments(cfg.Documents)
			metrics.ConfigReloads.WithLabelValues("policy", "success").Inc()
			s.opts.log.Info("policy loaded", "dir", s.dir, "generation", s.cur.Load().gen, "files", len(files), "documents", len(cfg.Documents), "rejected", cfg.Rejected())
			return nil
		}
	}
	s.failed, s.failedErr = sum, err
	metrics.ConfigReloads.WithLabelValues("policy", "failure").Inc()
	if cur := s.cur.Load(); cur != nil {
		s.opts.log.Error("policy reload failed; keeping the last good policy", "dir", s.dir, "generation", cur.gen, "err", err)
	}
	return err
}

// publish swaps in a new snapshot of set with the given name answers. s.mu is held.
func (s *Store) publish(set *Config, resolved map[string][]netip.Addr) {
	s.resolved = resolved
	var gen uint64 = 1
	if cur := s.cur.Load(); cur != nil {
		gen = cur.gen + 1
	}
	s.cur.Store(buildSnapshot(gen, set, s.wl, &s.opts, s.resolved))
}

// refresh re-resolves host names and publishes a new snapshot if any answer changed.
func (s *Store) refresh(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.docs == nil {
		return
	}
	if fresh := s.resolve(ctx, &s.docs.set); !maps.EqualFunc(s.resolved, fresh, slices.Equal) {
		s.publish(s.docs, fresh)
	}
}

// resolve looks up the names of the DestinationRules visible to the
// workload, concurrently and bounded by resolveTimeout. A name that fails
// keeps its last good addresses. s.mu is held.
func (s *Store) resolve(ctx context.Context, set *docSet) map[string][]netip.Addr {
	var names []string
	for _, d := range set.dests {
		if d.name != "" && d.visibleTo(s.wl) && !slices.Contains(names, d.name) {
			names = append(names, d.name)
		}
	}
	if len(names) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, resolveTimeout)
	defer cancel()
	answers := make([][]netip.Addr, len(names))
	errs := make([]error, len(names))
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Go(func() { answers[i], errs[i] = s.opts.resolve(ctx, name) })
	}
	wg.Wait()
	out := make(map[string][]netip.Addr, len(names))
	for i, name := range names {
		if errs[i] != nil {
			s.opts.log.Warn("policy: cannot resolve DestinationRule host; keeping its last addresses", "host", name, "err", errs[i])
			if old, ok := s.resolved[name]; ok {
				out[name] = old
			}
			continue
		}
		addrs := make([]netip.Addr, 0, len(answers[i]))
		for _, a := range answers[i] {
			addrs = append(addrs, a.Unmap())
		}
		slices.SortFunc(addrs, netip.Addr.Compare)
		out[name] = slices.Compact(addrs)
	}
	return out
}

func (s *Store) run(ctx context.Context) error {
	if s.dir == "" {
		<-ctx.Done()
		return nil
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		watch.Run(ctx, []string{s.dir}, func() { _ = s.reload(ctx) }, // reported inside
			watch.WithPoll(s.opts.pollEvery), watch.WithDebounce(settleDelay), watch.WithLogger(s.opts.log),
			watch.WithoutFirstCheck()) // NewStore has just loaded
	})
	dns := time.NewTicker(s.opts.resolveEvery)
	defer dns.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-dns.C:
			s.refresh(ctx)
		}
	}
}
