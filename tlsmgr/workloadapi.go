package tlsmgr

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshproxy/meshproxy/metrics"
)

// WorkloadAPISource is a Source fed by a SPIFFE Workload API, such as a
// SPIRE agent's socket. Run keeps one streaming FetchX509SVID call open and
// swaps in every X.509 context the agent pushes: the SVID (the agent
// renews it; this source never generates keys or CSRs) and the bundle set,
// which includes the bundles of federated trust domains. Each accepted
// update is validated (the SVID chains to its trust domain's bundle) and
// installed as one immutable snapshot, so Certificate stays a pointer load.
//
// When the agent is unreachable or refuses the workload, the source keeps
// serving the last SVID until it expires and reconnects with exponential
// backoff; Ready and Status say why no SVID is coming.
//
// The watch is go-spiffe's workloadapi.Client.WatchX509Context, the stream
// workloadapi.X509Source is built on, used directly because X509Source
// neither exposes its whole bundle set nor reports watch errors.
type WorkloadAPISource struct {
	notifier
	snapshot
	addr   string
	opts   options
	client *workloadapi.Client

	running   atomic.Bool
	stop      context.CancelFunc // ends Run (Close)
	stopped   context.Context
	done      chan struct{} // closed when Run returns
	closeOnce sync.Once
	closeErr  error

	// applyMu serialises applying contexts. Rotate holds it across its
	// fetch, so a streamed update that arrives meanwhile is applied after
	// the fetched one: the stream, which is ordered, always has the last
	// word.
	applyMu sync.Mutex
}

// WorkloadAPISourceName is Status().Source of a WorkloadAPISource.
const WorkloadAPISourceName = "workload-api"

// NewWorkloadAPISource returns a source for the Workload API at addr
// ("unix:///run/spire/agent.sock" or "tcp://127.0.0.1:8081"). It validates
// the address and sets up the client (ctx bounds that setup) but does not
// wait for the agent: Run watches it, Ready reports nil once the first SVID
// has arrived (WaitReady blocks until then) and, until then, says why not,
// for example that the socket is missing or that the agent knows no entry
// for this workload.
//
// Options that apply: WithID (pick the SVID with that SPIFFE ID when the
// workload is entitled to several; the default is the first, as the
// Workload API specifies), WithTrustDomain (refuse SVIDs from other trust
// domains), WithBackoff (reconnect delays), WithClock and WithLogger.
func NewWorkloadAPISource(ctx context.Context, addr string, opts ...Option) (*WorkloadAPISource, error) {
	if addr == "" {
		return nil, errors.New("workload api source: address is empty")
	}
	if err := workloadapi.ValidateAddress(addr); err != nil {
		return nil, fmt.Errorf("workload api source: address %q: %w", addr, err)
	}
	o, err := buildOptions(opts)
	if err != nil {
		return nil, fmt.Errorf("workload api source: %w", err)
	}
	s := &WorkloadAPISource{snapshot: newSnapshot(WorkloadAPISourceName, o.clock), addr: addr, opts: o, done: make(chan struct{})}
	s.stopped, s.stop = context.WithCancel(context.Background())
	// The dial does not block: an absent agent shows up as watch errors.
	s.client, err = workloadapi.New(ctx,
		workloadapi.WithAddr(addr),
		workloadapi.WithLogger(debugLogger{o.logger}),
		workloadapi.WithBackoffStrategy(backoffStrategy{o.backoffMin, o.backoffMax}))
	if err != nil {
		s.stop()
		return nil, fmt.Errorf("workload api source: connect to %s: %w", addr, err)
	}
	return s, nil
}

// Run watches the Workload API and applies every update until ctx ends or
// Close is called, then closes the connection and returns nil. Failures
// are retried with backoff and reported by Ready, Status, logs and
// metrics. Run may be called once.
func (s *WorkloadAPISource) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return fmt.Errorf("workload api source %s: Run called twice", s.addr)
	}
	defer close(s.done)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.stopped, cancel)()
	s.watch(ctx)
	return s.closeClient()
}

// Close ends Run (waiting for it) and closes the connection to the agent;
// a source that never ran must be closed. The source keeps answering with
// the last SVID. Close is idempotent.
func (s *WorkloadAPISource) Close() error {
	s.stop()
	if s.running.Load() {
		<-s.done
	}
	return s.closeClient()
}

func (s *WorkloadAPISource) closeClient() error {
	s.closeOnce.Do(func() {
		if err := s.client.Close(); err != nil {
			s.closeErr = fmt.Errorf("close workload api client for %s: %w", s.addr, err)
		}
	})
	return s.closeErr
}

// watch runs the Workload API stream until ctx ends. go-spiffe's watch
// reconnects by itself and only gives up on an error it deems permanent;
// the watch is then restarted after a backoff, since an agent upgrade may
// well fix it.
func (s *WorkloadAPISource) watch(ctx context.Context) {
	for attempt := 1; ; attempt++ {
		err := s.client.WatchX509Context(ctx, (*contextWatcher)(s))
		if ctx.Err() != nil {
			return
		}
		s.opts.logger.Error("workload api watch stopped, restarting", "addr", s.addr, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-s.opts.clock.After(backoff(s.opts.backoffMin, s.opts.backoffMax, attempt, rand.Float64())):
		}
	}
}

// contextWatcher receives the stream's callbacks; a distinct type keeps
// them out of WorkloadAPISource's method set.
type contextWatcher WorkloadAPISource

// OnX509ContextUpdate implements workloadapi.X509ContextWatcher.
func (w *contextWatcher) OnX509ContextUpdate(x *workloadapi.X509Context) {
	s := (*WorkloadAPISource)(w)
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	_ = s.apply(x)
}

// OnX509ContextWatchError implements workloadapi.X509ContextWatcher. It is
// called each time the stream fails, before go-spiffe retries.
func (w *contextWatcher) OnX509ContextWatchError(err error) {
	s := (*WorkloadAPISource)(w)
	if status.Code(err) == codes.Canceled {
		return // Close
	}
	err = fmt.Errorf("workload api %s: %w", s.addr, err)
	s.setErr(err)
	metrics.CertRotations.WithLabelValues("failure").Inc()
	attrs := []any{"addr", s.addr, "err", err}
	if cur := s.current(); cur != nil {
		attrs = append(attrs, "spiffe_id", cur.svid.ID.String(), "current_not_after", cur.svid.Certificates[0].NotAfter)
	}
	s.opts.logger.Warn("workload api watch failed, will retry; keeping the current certificate", attrs...)
	// Wake WaitReady so it can report why.
	s.notify()
}

// apply validates one X.509 context from the agent and installs it if it
// differs from the current snapshot. A refused update keeps the current
// snapshot and is reported in logs, metrics and Status. The caller holds
// applyMu.
func (s *WorkloadAPISource) apply(x *workloadapi.X509Context) error {
	svid, err := s.pick(x)
	if err != nil {
		err = fmt.Errorf("workload api %s: refused update: %w", s.addr, err)
		s.setErr(err)
		metrics.CertRotations.WithLabelValues("failure").Inc()
		s.opts.logger.Error("workload api update refused, keeping the current certificate", "addr", s.addr, "err", err)
		return err
	}
	s.setErr(nil)
	old := s.current()
	sameSVID := old != nil && slices.EqualFunc(old.svid.Certificates, svid.Certificates, (*x509.Certificate).Equal)
	if sameSVID && sameBundles(old.bundles, x.Bundles) {
		return nil // e.g. another SVID of this workload changed
	}
	next := newIdentity(svid, x.Bundles, s.nextGeneration())
	next.loadedAt = s.opts.clock.Now()
	if sameSVID {
		next.loadedAt = old.loadedAt
	}
	s.swap(next)

	leaf := svid.Certificates[0]
	tds := make([]string, 0, x.Bundles.Len())
	nroots := 0
	for _, b := range x.Bundles.Bundles() {
		tds = append(tds, b.TrustDomain().String())
		nroots += len(b.X509Authorities())
	}
	if sameSVID {
		s.opts.logger.Info("trust bundles updated from workload api", "addr", s.addr,
			"trust_domains", tds, "roots", nroots, "generation", next.gen)
	} else {
		metrics.CertExpiry.Set(float64(leaf.NotAfter.Unix()))
		metrics.CertRotations.WithLabelValues("success").Inc()
		s.opts.logger.Info("certificate updated from workload api", "addr", s.addr,
			"spiffe_id", svid.ID.String(),
			"serial", serialString(leaf.SerialNumber),
			"not_before", leaf.NotBefore,
			"not_after", leaf.NotAfter,
			"trust_domains", tds,
			"generation", next.gen)
	}
	s.notify()
	return nil
}

// pick chooses this source's SVID from x and validates it against x's
// bundles.
func (s *WorkloadAPISource) pick(x *workloadapi.X509Context) (*x509svid.SVID, error) {
	if len(x.SVIDs) == 0 || x.Bundles == nil {
		return nil, errors.New("no SVID in the update")
	}
	svid := x.DefaultSVID()
	if want := s.opts.id; !want.IsZero() {
		i := slices.IndexFunc(x.SVIDs, func(v *x509svid.SVID) bool { return v.ID == want })
		if i < 0 {
			got := make([]string, len(x.SVIDs))
			for j, v := range x.SVIDs {
				got[j] = v.ID.String()
			}
			return nil, fmt.Errorf("no SVID for %s among the %d offered (%s)", want, len(got), strings.Join(got, ", "))
		}
		svid = x.SVIDs[i]
	}
	checked, err := verifySVID(svid.Certificates, svid.PrivateKey, x.Bundles, s.opts.trustDomain, s.opts.clock.Now())
	if err != nil {
		return nil, err
	}
	checked.Hint = svid.Hint
	return checked, nil
}

// sameBundles reports whether a and b hold the same trust domains with the
// same authorities.
func sameBundles(a, b *x509bundle.Set) bool {
	if a.Len() != b.Len() {
		return false
	}
	for _, ba := range a.Bundles() {
		bb, ok := b.Get(ba.TrustDomain())
		if !ok || !ba.Equal(bb) {
			return false
		}
	}
	return true
}

// Rotate implements Source. The Workload API has no "renew now" call: the
// agent decides when to re-issue and pushes the result on the stream. So
// Rotate fetches the agent's current X.509 context once and applies it,
// which picks up anything the stream has not delivered yet; it returns the
// fetch or validation error, and the current SVID stays in use on failure.
func (s *WorkloadAPISource) Rotate(ctx context.Context) error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	x, err := s.client.FetchX509Context(ctx)
	if err != nil {
		err = fmt.Errorf("workload api %s: fetch x509 context: %w", s.addr, err)
		s.setErr(err)
		metrics.CertRotations.WithLabelValues("failure").Inc()
		s.opts.logger.Warn("workload api fetch failed, keeping the current certificate", "addr", s.addr, "err", err)
		return err
	}
	return s.apply(x)
}

// backoffStrategy is the Rotator's schedule (exponential with jitter) in
// go-spiffe's reconnect interface.
type backoffStrategy struct{ min, max time.Duration }

func (b backoffStrategy) NewBackoff() workloadapi.Backoff { return &backoffState{strategy: b} }

type backoffState struct {
	strategy backoffStrategy
	failures int
}

func (b *backoffState) Next() time.Duration {
	b.failures++
	return backoff(b.strategy.min, b.strategy.max, b.failures, rand.Float64())
}

func (b *backoffState) Reset() { b.failures = 0 }

// debugLogger passes go-spiffe's own log lines to slog at debug level;
// the source logs every error itself, with context, at the right level.
type debugLogger struct{ l *slog.Logger }

func (d debugLogger) Debugf(format string, args ...any) { d.l.Debug(fmt.Sprintf(format, args...)) }
func (d debugLogger) Infof(format string, args ...any)  { d.l.Debug(fmt.Sprintf(format, args...)) }
func (d debugLogger) Warnf(format string, args ...any)  { d.l.Debug(fmt.Sprintf(format, args...)) }
func (d debugLogger) Errorf(format string, args ...any) { d.l.Debug(fmt.Sprintf(format, args...)) }
