package policy

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/metrics"
)

// Mode is a PeerAuthentication mutual-TLS mode.
type Mode int

// The PeerAuthentication modes. ModeUnset inherits from the enclosing level.
const (
	ModeUnset Mode = iota
	ModeDisable
	ModePermissive
	ModeStrict
)

// String returns Istio's spelling of the mode ("UNSET", "DISABLE", "PERMISSIVE", "STRICT").
func (m Mode) String() string {
	switch m {
	case ModeUnset:
		return "UNSET"
	case ModeDisable:
		return "DISABLE"
	case ModePermissive:
		return "PERMISSIVE"
	case ModeStrict:
		return "STRICT"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses Istio's spelling of a mode, case-insensitively. The empty
// string is ModeUnset.
func ParseMode(s string) (Mode, error) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "", "UNSET":
		return ModeUnset, nil
	case "DISABLE":
		return ModeDisable, nil
	case "PERMISSIVE":
		return ModePermissive, nil
	case "STRICT":
		return ModeStrict, nil
	}
	return ModeUnset, fmt.Errorf("unknown mTLS mode %q (want STRICT, PERMISSIVE, DISABLE or UNSET)", s)
}

// Workload is the workload this sidecar serves: policies select it by
// namespace and labels.
type Workload struct {
	Namespace string
	Labels    map[string]string
}

// Request is one inbound connection to authorize.
type Request struct {
	Peer spiffeid.ID // zero value when the peer is not mesh mTLS (plaintext / passthrough)
	Port uint16      // destination port on this workload
	// Source is the peer's address as the sidecar sees it (with TPROXY the
	// real client): ipBlocks, remoteIpBlocks, source.ip and remote.ip.
	// Invalid when unknown: then no IP block matches.
	Source netip.Addr
	// Dest is the destination address (destination.ip); invalid when unknown.
	Dest netip.Addr
	// SNI is the server name the peer sent (connection.sni), "" for none.
	SNI string
	// TrustDomain is the workload's own trust domain. A peer from another
	// (federated) trust domain is allowed only by an ALLOW rule that names
	// that trust domain in a principal (see ReasonForeignTrustDomain). Zero
	// skips the check.
	TrustDomain spiffeid.TrustDomain
}

// Decision is the outcome of authorizing a Request.
type Decision struct {
	Allowed bool
	Reason  string // bounded, for metrics: "allowed", "denied_by_policy", "no_allow_match", "foreign_trust_domain"
	Policy  string // "namespace/name" of the deciding policy, for logs ("" when none)
	// DryRun is what each istio.io/dry-run policy of the workload would
	// have decided on its own; it never changes Allowed.
	DryRun []DryRun
}

// DryRun is the shadow result of one dry-run AuthorizationPolicy.
type DryRun struct {
	Policy  string // namespace/name
	Action  string // ALLOW or DENY
	Allowed bool   // what the policy alone would have decided
}

// Decision reasons.
const (
	ReasonAllowed        = "allowed"
	ReasonDeniedByPolicy = "denied_by_policy"
	ReasonNoAllowMatch   = "no_allow_match"
	// ReasonForeignTrustDomain: the peer is from another trust domain and no
	// ALLOW rule names that trust domain.
	ReasonForeignTrustDomain = "foreign_trust_domain"
)

// Outbound is the DestinationRule verdict for one destination.
type Outbound struct {
	Matched bool          // a DestinationRule covers dst
	MTLS    bool          // tls.mode ISTIO_MUTUAL (false for DISABLE)
	SANs    []spiffeid.ID // tls.subjectAltNames: expected server SPIFFE IDs (empty = any in trust domain)
	// Refuse: the rule covering dst was rejected and asked for TLS
	// origination; the connection must be refused, not sent in plaintext.
	Refuse bool
	// Originate is the TLS origination (tls.mode SIMPLE or MUTUAL) for dst;
	// nil for none.
	Originate *Origination
	// Pool is the connectionPool.tcp covering dst (nil for none), whatever
	// its TLS setting.
	Pool *TCPPool
}

// Snapshot is an immutable, validated set of policies for one workload.
type Snapshot struct {
	gen         uint64
	wl          Workload
	rootNS      string
	defaultMode Mode
	peer        peerAuthn
	authz       authzPolicies
	dests       destRules
	resolved    map[string][]netip.Addr // DestinationRule host names and their addresses
	docs        []Document              // the documents not applied as written, for GET /config
	log         *slog.Logger
}

// Generation counts the snapshots a Store has published: it increases with
// every new snapshot (a changed directory, or changed DNS answers for a
// DestinationRule host).
func (s *Snapshot) Generation() uint64 { return s.gen }

// InboundMode returns the effective mTLS mode for an inbound port. It is
// never ModeUnset.
func (s *Snapshot) InboundMode(port uint16) Mode { return s.peer.modeFor(port) }

// Authorize evaluates the AuthorizationPolicies for r as Istio does for TCP:
// DENY policies first, then, if any ALLOW policy applies to the workload, r
// must match one. Dry-run policies are evaluated too, counted in
// meshproxy_authz_dry_run_total and logged, but never change the decision.
func (s *Snapshot) Authorize(r Request) Decision {
	d := s.authz.authorize(r)
	d.DryRun = s.authz.shadow(r)
	for _, dr := range d.DryRun {
		result := "deny"
		if dr.Allowed {
			result = "allow"
		}
		metrics.AuthzDryRun.WithLabelValues(dr.Policy, result).Inc()
		if s.log != nil {
			s.log.Info("dry-run authorization policy evaluated (not enforced)", "policy", dr.Policy, "action", dr.Action,
				"dry_run_result", result, "enforced_result", d.Reason, "peer", r.Peer.String(), "port", r.Port)
		}
	}
	return d
}

// Outbound returns the most specific DestinationRule setting covering dst,
// a destination that is not known to be in the mesh: mesh-wide wildcard
// hosts (*.local) do not cover it.
func (s *Snapshot) Outbound(dst netip.AddrPort) Outbound { return s.dests.lookup(dst, false) }

// OutboundMesh is Outbound for a destination known to be in the mesh (in
// --mesh-cidrs): mesh-wide wildcard hosts (*.local, *.svc.cluster.local)
// cover it too.
func (s *Snapshot) OutboundMesh(dst netip.AddrPort) Outbound { return s.dests.lookup(dst, true) }

// OutboundName returns the DestinationRule setting for a destination known
// by name (an SNI, an explicit outbound's host): the rule of that exact
// host, else of the longest matching wildcard host, else of "*" — its TLS
// setting (Matched when it has one) and its connectionPool.tcp, port-level
// first.
func (s *Snapshot) OutboundName(name string, port uint16) Outbound {
	return s.dests.lookupName(name, port)
}

// MatchesByName reports whether a DestinationRule applies to this workload
// whose host only a destination's name can match (a wildcard host such as
// *.example.com, not a mesh-wide form): only then is it worth learning the
// name of a captured destination from its TLS ClientHello.
func (s *Snapshot) MatchesByName() bool { return s.dests.matchesByName() }

// MarshalJSON renders the effective policy, for the admin API's GET /config.
func (s *Snapshot) MarshalJSON() ([]byte, error) { return json.Marshal(s.view()) }

// Option configures a Store.
type Option func(*options)

type options struct {
	strict       bool
	defaultMode  Mode
	rootNS       string
	td           spiffeid.TrustDomain
	log          *slog.Logger
	resolve      ResolveFunc
	resolveEvery time.Duration
	pollEvery    time.Duration
}

func defaultOptions() options {
	return options{
		defaultMode:  ModePermissive,
		rootNS:       "istio-system",
		td:           spiffeid.RequireTrustDomainFromString(defaultTrustDomain),
		log:          slog.Default(),
		resolve:      ResolveWith(net.DefaultResolver),
		resolveEvery: 30 * time.Second,
		pollEvery:    2 * time.Second,
	}
}

const defaultTrustDomain = "cluster.local"

// WithDefaultMode sets the mesh default used when no PeerAuthentication
// applies (default PERMISSIVE). ModeUnset leaves the default unchanged.
func WithDefaultMode(m Mode) Option {
	return func(o *options) {
		if m != ModeUnset {
			o.defaultMode = m
		}
	}
}

// WithStrictConfig makes any rejected document fail the whole load, as
// before documents were isolated: NewStore returns an error, and a reload
// keeps the last good policy. Off by default (meshproxy run --strict-config).
func WithStrictConfig(strict bool) Option {
	return func(o *options) { o.strict = strict }
}

// WithRootNamespace sets the mesh root namespace whose selector-less policies
// apply mesh-wide (default "istio-system").
func WithRootNamespace(ns string) Option {
	return func(o *options) {
		if ns != "" {
			o.rootNS = ns
		}
	}
}

// WithTrustDomain sets the mesh's trust domain (default "cluster.local"). As
// in Istio, the trust domain "cluster.local" written in a principal stands
// for this one.
func WithTrustDomain(td spiffeid.TrustDomain) Option {
	return func(o *options) {
		if !td.IsZero() {
			o.td = td
		}
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.log = l
		}
	}
}

// WithResolver sets how DestinationRule host names are resolved (default
// ResolveWith(net.DefaultResolver): the system's).
func WithResolver(f ResolveFunc) Option {
	return func(o *options) {
		if f != nil {
			o.resolve = f
		}
	}
}

// WithResolveInterval sets how often Run re-resolves DestinationRule host
// names (default 30s).
func WithResolveInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.resolveEvery = d
		}
	}
}

// WithPollInterval sets how often Run re-reads the directory in case a change
// escaped fsnotify (default 2s).
func WithPollInterval(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.pollEvery = d
		}
	}
}

// Store loads --config-dir, watches it, and swaps snapshots atomically.
type Store struct {
	dir  string
	wl   Workload
	opts options
	cur  atomic.Pointer[Snapshot]

	mu        sync.Mutex // serialises reloads and DNS refreshes; guards the fields below
	docs      *Config    // last good directory content
	hash      [sha256.Size]byte
	failed    [sha256.Size]byte // last failed content (or read error), reported once
	failedErr error
	resolved  map[string][]netip.Addr
}

// Current returns the snapshot in force. It is never nil.
func (s *Store) Current() *Snapshot { return s.cur.Load() }

// Run watches the directory (fsnotify, plus a periodic re-read that catches
// ConfigMap symlink swaps) and reloads on change, and re-resolves
// DestinationRule host names, until ctx is done; it then returns nil. A bad
// directory is logged and counted, and the last good snapshot stays. A Store
// without a directory just waits for ctx.
func (s *Store) Run(ctx context.Context) error { return s.run(ctx) }
