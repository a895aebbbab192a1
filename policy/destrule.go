package policy

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// ResolveFunc resolves a DestinationRule host name to addresses.
type ResolveFunc func(ctx context.Context, host string) ([]netip.Addr, error)

// ResolveWith resolves DestinationRule hosts through r (IPv4 and IPv6
// addresses); WithResolver(ResolveWith(r)) makes a Store use it.
func ResolveWith(r *net.Resolver) ResolveFunc {
	return func(ctx context.Context, host string) ([]netip.Addr, error) {
		return r.LookupNetIP(ctx, "ip", host)
	}
}

// destRule is one validated DestinationRule.
type destRule struct {
	meta
	host   string       // as written, for logs and GET /config
	prefix netip.Prefix // for an IP, CIDR or "*"
	name   string       // a DNS name to resolve (short names qualified with the rule's namespace)
	any    bool         // host "*"
	// wildcard is the suffix of a wildcard host ("*.example.com" →
	// ".example.com"): it matches destinations by name. The mesh-wide forms
	// (*.local, *.cluster.local, *.svc.cluster.local) also cover every mesh
	// destination reached by address (meshWide).
	wildcard string
	meshWide bool
	exportTo []string // nil: visible everywhere
	selector map[string]string
	tls      *tlsSetting // rule level; nil when unset
	ports    map[uint16]*tlsSetting
	pool     *TCPPool            // connectionPool.tcp, rule level; nil when unset
	poolPort map[uint16]*TCPPool // port level
}

type tlsSetting struct {
	mtls bool
	sans []spiffeid.ID
	// refuse: the stand-in of a rejected TLS-origination rule; connections
	// to the host are refused rather than sent in plaintext.
	refuse bool
	orig   *Origination // SIMPLE or MUTUAL
}

// Origination is a DestinationRule's TLS origination (tls.mode SIMPLE or
// MUTUAL): the sidecar takes the app's plaintext and opens TLS to the
// destination itself.
type Origination struct {
	Mutual bool // MUTUAL: present a client certificate
	// Files on the sidecar's file system (PEM), or CredentialName: the
	// credential NAME.crt, NAME.key and NAME-ca.crt in the sidecar's
	// --credentials-dir.
	CACertificates, ClientCertificate, PrivateKey string
	CredentialName                                string
	SNI                                           string   // server name to send ("" for none)
	SubjectAltNames                               []string // the server must present one (DNS name, URI or IP); none: the SNI, if any
	InsecureSkipVerify                            bool     // no verification at all
}

// compileOrigination applies Istio's rules for SIMPLE and MUTUAL.
func compileOrigination(path string, t *clientTLS) (*Origination, error) {
	o := &Origination{Mutual: t.Mode == "MUTUAL", CACertificates: t.CACertificates, ClientCertificate: t.ClientCertificate,
		PrivateKey: t.PrivateKey, CredentialName: t.CredentialName, SNI: t.SNI, SubjectAltNames: t.SubjectAltNames}
	if !isUnset(t.InsecureSkipVerify) {
		if err := json.Unmarshal(t.InsecureSkipVerify, &o.InsecureSkipVerify); err != nil {
			return nil, fieldErrorf(path+".insecureSkipVerify", "want a boolean")
		}
	}
	if t.CACrl != "" {
		return nil, fieldErrorf(path+".caCrl", "certificate revocation lists are not supported by meshproxy; fails closed: connections to the host are refused")
	}
	if o.InsecureSkipVerify && (o.CACertificates != "" || len(o.SubjectAltNames) > 0 || (!o.Mutual && o.CredentialName != "")) {
		return nil, fieldErrorf(path+".insecureSkipVerify", "cannot be set with caCertificates, subjectAltNames or credentialName")
	}
	if o.CredentialName != "" {
		if o.ClientCertificate != "" || o.CACertificates != "" || o.PrivateKey != "" {
			return nil, fieldErrorf(path+".credentialName", "cannot be set with clientCertificate, privateKey or caCertificates")
		}
		if strings.Contains(o.CredentialName, "/") || strings.HasPrefix(o.CredentialName, ".") {
			return nil, fieldErrorf(path+".credentialName", "%q: want a credential name, not a path", o.CredentialName)
		}
		return o, nil
	}
	if o.Mutual && o.ClientCertificate == "" {
		return nil, fieldErrorf(path+".clientCertificate", "required for MUTUAL")
	}
	if o.Mutual && o.PrivateKey == "" {
		return nil, fieldErrorf(path+".privateKey", "required for MUTUAL")
	}
	return o, nil
}

func compileDestRule(m meta, spec *destRuleSpec, warn func(field, format string, args ...any)) (*destRule, error) {
	d := &destRule{meta: m, host: spec.Host}
	if err := d.parseHost(spec.Host); err != nil {
		return nil, err
	}
	if err := checkExportTo(m.namespace, spec.ExportTo, spec.WorkloadSelector != nil); err != nil {
		return nil, err
	}
	d.exportTo = spec.ExportTo
	d.selector = spec.WorkloadSelector.labels()
	if err := validateSelector("spec.workloadSelector", spec.WorkloadSelector, warn); err != nil {
		return nil, err
	}
	if err := checkSubsets(spec.Subsets); err != nil {
		return nil, err
	}
	for i, s := range spec.Subsets {
		path := fmt.Sprintf("spec.subsets[%d]", i)
		if len(s.TrafficPolicy) > 0 && !manifest.IsNull(s.TrafficPolicy) {
			warn(path+".trafficPolicy", "ignored: subsets need endpoint labels, which meshproxy does not know (it forwards to the original destination)")
		}
	}
	tp := spec.TrafficPolicy
	if tp == nil {
		return d, nil
	}
	if tp.TLS == nil && tp.PortLevelSettings == nil && tp.ConnectionPool == nil && isUnset(tp.LoadBalancer) && isUnset(tp.OutlierDetection) &&
		isUnset(tp.Tunnel) && isUnset(tp.ProxyProtocol) && isUnset(tp.RetryBudget) {
		return nil, fieldErrorf("spec.trafficPolicy", "must set at least one field")
	}
	if err := checkOutlierDetection("spec.trafficPolicy.outlierDetection", tp.OutlierDetection); err != nil {
		return nil, err
	}
	if err := validateLoadBalancer("spec.trafficPolicy.loadBalancer", tp.LoadBalancer); err != nil {
		return nil, err
	}
	warnIgnored(warn, "spec.trafficPolicy", tp.LoadBalancer, tp.ConnectionPool, tp.OutlierDetection)
	for _, f := range []struct {
		name string
		raw  []byte
		why  string
	}{
		{"tunnel", tp.Tunnel, "tunnelling to a proxy is not supported"},
		{"proxyProtocol", tp.ProxyProtocol, "meshproxy does not send PROXY protocol headers upstream"},
		{"retryBudget", tp.RetryBudget, "retries are HTTP-only"},
	} {
		if len(f.raw) > 0 && !manifest.IsNull(f.raw) {
			warn("spec.trafficPolicy."+f.name, "ignored: %s", f.why)
		}
	}
	var err error
	if d.tls, err = compileTLS("spec.trafficPolicy.tls", tp.TLS, warn); err != nil {
		return nil, err
	}
	if d.pool, err = compilePool("spec.trafficPolicy.connectionPool", tp.ConnectionPool, d.id(), warn); err != nil {
		return nil, err
	}
	for i, pl := range tp.PortLevelSettings {
		path := fmt.Sprintf("spec.trafficPolicy.portLevelSettings[%d]", i)
		if pl.Port == nil || pl.Port.Number == 0 || pl.Port.Number > 65535 {
			return nil, fieldErrorf(path+".port.number", "want a port number 1-65535")
		}
		port := uint16(pl.Port.Number)
		if err := checkOutlierDetection(path+".outlierDetection", pl.OutlierDetection); err != nil {
			return nil, err
		}
		if err := validateLoadBalancer(path+".loadBalancer", pl.LoadBalancer); err != nil {
			return nil, err
		}
		warnIgnored(warn, path, pl.LoadBalancer, pl.ConnectionPool, pl.OutlierDetection)
		if _, dup := d.ports[port]; dup {
			return nil, fieldErrorf(path+".port.number", "port %d is set twice", port)
		}
		t, err := compileTLS(path+".tls", pl.TLS, warn)
		if err != nil {
			return nil, err
		}
		if d.ports == nil {
			d.ports = make(map[uint16]*tlsSetting)
		}
		d.ports[port] = t // nil: the rule-level setting applies
		pool, err := compilePool(path+".connectionPool", pl.ConnectionPool, fmt.Sprintf("%s:%d", d.id(), port), warn)
		if err != nil {
			return nil, err
		}
		if pool != nil {
			if d.poolPort == nil {
				d.poolPort = make(map[uint16]*TCPPool)
			}
			d.poolPort[port] = pool
		}
	}
	return d, nil
}

// TCPPool is a DestinationRule's connectionPool.tcp, enforced on outbound
// connections: at most MaxConnections open at once for the rule (per port
// for a port-level setting), dialled within ConnectTimeout, with TCP
// keepalive probes as configured.
type TCPPool struct {
	// Key names the rule (and port) the limit is counted for.
	Key            string
	MaxConnections int           // 0: no limit
	ConnectTimeout time.Duration // 0: the default
	Keepalive      *Keepalive    // nil: the system's
}

// Keepalive is connectionPool.tcp.tcpKeepalive.
type Keepalive struct {
	Time, Interval time.Duration // 0: the system's
	Probes         int           // 0: the system's
}

type tcpPoolSpec struct {
	MaxConnections        *int64          `json:"maxConnections"`
	ConnectTimeout        string          `json:"connectTimeout"`
	TCPKeepalive          *keepaliveSpec  `json:"tcpKeepalive"`
	MaxConnectionDuration string          `json:"maxConnectionDuration"`
	IdleTimeout           string          `json:"idleTimeout"`
	TCPNoDelay            json.RawMessage `json:"tcpNoDelay"`
}

type keepaliveSpec struct {
	Probes   *int64 `json:"probes"`
	Time     string `json:"time"`
	Interval string `json:"interval"`
}

// compilePool reads connectionPool.tcp (connectionPool.http is warned
// about by warnIgnored); nil when unset.
func compilePool(path string, pool *connectionPool, key string, warn func(field, format string, args ...any)) (*TCPPool, error) {
	if err := checkConnectionPool(path, pool); err != nil {
		return nil, err
	}
	if pool == nil || isUnset(pool.TCP) {
		return nil, nil
	}
	path += ".tcp"
	var s tcpPoolSpec
	if err := manifest.Decode(path, pool.TCP, &s); err != nil {
		return nil, err
	}
	out := &TCPPool{Key: key}
	if s.MaxConnections != nil {
		if *s.MaxConnections < 0 || *s.MaxConnections > 1<<31-1 {
			return nil, fieldErrorf(path+".maxConnections", "want 0 to 2147483647")
		}
		out.MaxConnections = int(*s.MaxConnections)
	}
	duration := func(field, v string) (time.Duration, error) {
		if v == "" {
			return 0, nil
		}
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Millisecond {
			return 0, fieldErrorf(path+"."+field, "%q: want a duration of at least 1ms", v)
		}
		return d, nil
	}
	var err error
	if out.ConnectTimeout, err = duration("connectTimeout", s.ConnectTimeout); err != nil {
		return nil, err
	}
	if k := s.TCPKeepalive; k != nil {
		out.Keepalive = &Keepalive{}
		if out.Keepalive.Time, err = duration("tcpKeepalive.time", k.Time); err != nil {
			return nil, err
		}
		if out.Keepalive.Interval, err = duration("tcpKeepalive.interval", k.Interval); err != nil {
			return nil, err
		}
		if k.Probes != nil {
			if *k.Probes < 0 || *k.Probes > 1<<31-1 {
				return nil, fieldErrorf(path+".tcpKeepalive.probes", "want 0 to 2147483647")
			}
			out.Keepalive.Probes = int(*k.Probes)
		}
	}
	for _, f := range []struct{ name, v string }{{"maxConnectionDuration", s.MaxConnectionDuration}, {"idleTimeout", s.IdleTimeout}} {
		if f.v != "" {
			if _, err := duration(f.name, f.v); err != nil {
				return nil, err
			}
			warn(path+"."+f.name, "ignored: meshproxy closes idle connections after --idle-timeout")
		}
	}
	if !isUnset(s.TCPNoDelay) {
		warn(path+".tcpNoDelay", "ignored: Go sets TCP_NODELAY on every connection")
	}
	return out, nil
}

func isUnset(raw json.RawMessage) bool { return len(raw) == 0 || manifest.IsNull(raw) }

// validateLoadBalancer applies the schema rules Istio's API server enforces
// on a load balancer's warmup, although meshproxy ignores the setting: a
// document Istio refuses is refused here too.
func validateLoadBalancer(path string, raw json.RawMessage) error {
	if len(raw) == 0 || manifest.IsNull(raw) {
		return nil
	}
	var lb struct {
		Warmup *struct {
			Duration       *string  `json:"duration"`
			MinimumPercent *float64 `json:"minimumPercent"`
			Aggression     *float64 `json:"aggression"`
		} `json:"warmup"`
	}
	if err := json.Unmarshal(raw, &lb); err != nil {
		return fieldErrorf(path, "%v", err)
	}
	w := lb.Warmup
	if w == nil {
		return nil
	}
	path += ".warmup"
	if w.Duration == nil {
		return fieldErrorf(path+".duration", "required")
	}
	if d, err := time.ParseDuration(*w.Duration); err != nil || d < time.Millisecond {
		return fieldErrorf(path+".duration", "%q: want a duration of at least 1ms", *w.Duration)
	}
	if p := w.MinimumPercent; p != nil && (*p < 0 || *p > 100) {
		return fieldErrorf(path+".minimumPercent", "%v: want 0-100", *p)
	}
	if a := w.Aggression; a != nil && *a < 0 {
		return fieldErrorf(path+".aggression", "%v: must not be negative", *a)
	}
	return nil
}

// warnIgnored warns about the traffic-policy fields that have no effect on
// a forwarder to the original destination.
func warnIgnored(warn func(field, format string, args ...any), path string, lb json.RawMessage, pool *connectionPool, outlier json.RawMessage) {
	const why = "ignored: meshproxy forwards each connection to its original destination, so there is no load balancing or endpoint ejection"
	if len(lb) > 0 && !manifest.IsNull(lb) {
		warn(path+".loadBalancer", why)
	}
	if len(outlier) > 0 && !manifest.IsNull(outlier) {
		warn(path+".outlierDetection", why)
	}
	if pool != nil && len(pool.HTTP) > 0 && !manifest.IsNull(pool.HTTP) {
		warn(path+".connectionPool.http", "ignored: HTTP connection pooling is HTTP-only")
	}
}

func (d *destRule) parseHost(h string) error {
	const path = "spec.host"
	switch {
	case h == "":
		return fieldErrorf(path, "required")
	case h == "*":
		d.any = true
		return nil
	case strings.HasPrefix(h, "*."):
		suffix := strings.TrimSuffix(strings.ToLower(h[1:]), ".")
		if errs := validation.IsDNS1123Subdomain(suffix[1:]); len(errs) > 0 || strings.Contains(suffix, "*") {
			return fieldErrorf(path, "%q is not a wildcard DNS name (*.domain)", h)
		}
		d.wildcard = suffix
		switch suffix {
		case ".local", ".cluster.local", ".svc.cluster.local":
			d.meshWide = true
		}
		return nil
	case strings.Contains(h, "*"):
		return fieldErrorf(path, "%q: a wildcard host is \"*\" or starts with \"*.\"", h)
	}
	if a, err := netip.ParseAddr(h); err == nil {
		a = a.Unmap()
		d.prefix = netip.PrefixFrom(a, a.BitLen())
		return nil
	}
	if p, err := netip.ParsePrefix(h); err == nil {
		if p.Addr().Is4In6() {
			return fieldErrorf(path, "%q: write IPv4 CIDRs in IPv4 form", h)
		}
		d.prefix = p.Masked()
		return nil
	}
	name := strings.TrimSuffix(strings.ToLower(h), ".")
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fieldErrorf(path, "%q is not an IP, CIDR or DNS name: %s", h, strings.Join(errs, "; "))
	}
	if !strings.Contains(name, ".") {
		// An Istio short name is relative to the rule's namespace; the
		// resolver's search path completes "name.namespace".
		name += "." + d.namespace
	}
	d.name = name
	return nil
}

func compileTLS(path string, t *clientTLS, warn func(field, format string, args ...any)) (*tlsSetting, error) {
	if t == nil {
		return nil, nil
	}
	s := &tlsSetting{}
	switch t.Mode {
	case "", "DISABLE":
	case "ISTIO_MUTUAL":
		s.mtls = true
	case "SIMPLE", "MUTUAL":
		o, err := compileOrigination(path, t)
		if err != nil {
			return nil, err
		}
		return &tlsSetting{orig: o}, nil
	default:
		return nil, fieldErrorf(path+".mode", "unknown mode %q (want DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL)", t.Mode)
	}
	// With ISTIO_MUTUAL (or DISABLE) Istio uses the mesh's own certificates
	// and ignores these; meshproxy sends the mesh SNI itself.
	for _, f := range []struct{ name, v string }{
		{"clientCertificate", t.ClientCertificate}, {"privateKey", t.PrivateKey}, {"caCertificates", t.CACertificates},
		{"caCrl", t.CACrl}, {"credentialName", t.CredentialName}, {"sni", t.SNI},
	} {
		if f.v != "" {
			warn(path+"."+f.name, "ignored with mode %s (meshproxy uses the mesh identity and SNI)", cmp.Or(t.Mode, "DISABLE"))
		}
	}
	if len(t.InsecureSkipVerify) > 0 && !manifest.IsNull(t.InsecureSkipVerify) {
		warn(path+".insecureSkipVerify", "ignored: mesh peers are always verified by SPIFFE ID")
	}
	if len(t.SubjectAltNames) > 0 && !s.mtls {
		return nil, fieldErrorf(path+".subjectAltNames", "only meaningful with mode ISTIO_MUTUAL")
	}
	for i, san := range t.SubjectAltNames {
		id, err := parseSAN(san)
		if err != nil {
			return nil, fieldErrorf(fmt.Sprintf("%s.subjectAltNames[%d]", path, i), "%v", err)
		}
		s.sans = append(s.sans, id)
	}
	return s, nil
}

// parseSAN accepts a SPIFFE ID with or without its scheme
// ("spiffe://cluster.local/ns/a/sa/b" or Istio's "cluster.local/ns/a/sa/b").
func parseSAN(s string) (spiffeid.ID, error) {
	if !strings.HasPrefix(s, "spiffe://") {
		s = "spiffe://" + s
	}
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%q is not a SPIFFE ID: %w", s, err)
	}
	if id.Path() == "" {
		return spiffeid.ID{}, fmt.Errorf("%q is not a workload SPIFFE ID (no path)", s)
	}
	return id, nil
}

// visibleTo reports whether the rule applies to the workload: exportTo lets
// it out of its namespace, and a workloadSelector narrows it to labelled
// workloads of its own namespace.
func (d *destRule) visibleTo(wl Workload) bool {
	if d.selector != nil && (d.namespace != wl.Namespace || !selects(d.selector, wl.Labels)) {
		return false
	}
	if d.exportTo == nil {
		return true
	}
	for _, e := range d.exportTo {
		switch e {
		case "*":
			return true
		case ".":
			if d.namespace == wl.Namespace {
				return true
			}
		case "~":
		default:
			if e == wl.Namespace {
				return true
			}
		}
	}
	return false
}

// destEntry is one (address range, port) a DestinationRule sets TLS for.
type destEntry struct {
	prefix netip.Prefix
	port   uint16 // 0: every port
	tls    *tlsSetting
	pool   *TCPPool
	rule   *destRule
	rank   int // tie-break between rules of equal specificity: lower wins
}

// meshOnly reports whether the entry covers mesh destinations only (a
// mesh-wide wildcard host reached by address).
func (e *destEntry) meshOnly() bool { return e.rule.meshWide }

// destRules is a lookup table from destination to TLS setting, most
// specific first: longer prefix, then port-level before rule-level, then
// rule precedence (our namespace, other namespaces, the root namespace; older
// first).
type destRules struct {
	entries []destEntry
	pools   []destEntry // connection pools, in the same order
	visible []*destRule // in precedence order, for lookups by name
}

func buildDestRules(all []*destRule, wl Workload, rootNS string, resolved map[string][]netip.Addr) destRules {
	visible := make([]*destRule, 0, len(all))
	for _, d := range all {
		if d.visibleTo(wl) {
			visible = append(visible, d)
		}
	}
	nsRank := func(d *destRule) int {
		switch d.namespace {
		case wl.Namespace:
			return 0
		case rootNS:
			return 2
		}
		return 1
	}
	slices.SortStableFunc(visible, func(a, b *destRule) int {
		if c := cmp.Compare(nsRank(a), nsRank(b)); c != 0 {
			return c
		}
		return a.meta.compare(b.meta)
	})
	out := destRules{visible: visible}
	for rank, d := range visible {
		var prefixes []netip.Prefix
		switch {
		case d.any, d.meshWide:
			prefixes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
		case d.wildcard != "":
			// Matched by name only (LookupName): a wildcard has no addresses.
		case d.name != "":
			for _, a := range resolved[d.name] {
				a = a.Unmap()
				prefixes = append(prefixes, netip.PrefixFrom(a, a.BitLen()))
			}
		default:
			prefixes = []netip.Prefix{d.prefix}
		}
		for _, p := range prefixes {
			if d.pool != nil {
				out.pools = append(out.pools, destEntry{prefix: p, pool: d.pool, rule: d, rank: rank})
			}
			for port, pool := range d.poolPort {
				out.pools = append(out.pools, destEntry{prefix: p, port: port, pool: pool, rule: d, rank: rank})
			}
			if d.tls != nil {
				out.entries = append(out.entries, destEntry{prefix: p, tls: d.tls, rule: d, rank: rank})
			}
			for port, t := range d.ports {
				if t == nil {
					t = d.tls
				}
				if t != nil {
					out.entries = append(out.entries, destEntry{prefix: p, port: port, tls: t, rule: d, rank: rank})
				}
			}
		}
	}
	bySpecificity := func(a, b destEntry) int {
		if c := cmp.Compare(b.prefix.Bits(), a.prefix.Bits()); c != 0 {
			return c
		}
		if c := cmp.Compare(b.port, a.port); c != 0 { // port-level (non-zero) first
			return c
		}
		return cmp.Compare(a.rank, b.rank)
	}
	slices.SortStableFunc(out.entries, bySpecificity)
	slices.SortStableFunc(out.pools, bySpecificity)
	return out
}

// lookup finds the TLS setting and, independently (as Istio merges a
// port's settings field by field), the connection pool covering dst.
func (d *destRules) lookup(dst netip.AddrPort, mesh bool) Outbound {
	addr := dst.Addr().Unmap()
	covers := func(e *destEntry) bool {
		return (!e.meshOnly() || mesh) && (e.port == 0 || e.port == dst.Port()) && e.prefix.Contains(addr)
	}
	var out Outbound
	for i := range d.entries {
		if e := &d.entries[i]; covers(e) {
			out = Outbound{Matched: true, MTLS: e.tls.mtls, SANs: slices.Clone(e.tls.sans), Refuse: e.tls.refuse, Originate: e.tls.orig}
			break
		}
	}
	for i := range d.pools {
		if e := &d.pools[i]; covers(e) {
			out.Pool = e.pool
			break
		}
	}
	return out
}

// lookupName returns the rule covering a destination known by name (SNI,
// an explicit outbound's host): an exact host first, then the longest
// wildcard suffix, then "*"; a port-level setting before the rule level.
func (d *destRules) lookupName(name string, port uint16) Outbound {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	best, bestLen := (*destRule)(nil), -1
	for _, r := range d.visible {
		l := -1
		switch {
		case r.name != "" && (r.name == name || r.host == name):
			l = len(name) + 1
		case r.wildcard != "" && strings.HasSuffix(name, r.wildcard):
			l = len(r.wildcard)
		case r.any:
			l = 0
		}
		if l > bestLen {
			best, bestLen = r, l
		}
	}
	if best == nil {
		return Outbound{}
	}
	// One rule decides, as in Istio (the most specific host); its
	// port-level settings before its rule-level ones.
	var out Outbound
	out.Pool = best.pool
	if pp, ok := best.poolPort[port]; ok {
		out.Pool = pp
	}
	t := best.tls
	if pt, ok := best.ports[port]; ok && pt != nil {
		t = pt
	}
	if t != nil {
		out.Matched, out.MTLS, out.SANs, out.Refuse, out.Originate = true, t.mtls, slices.Clone(t.sans), t.refuse, t.orig
	}
	return out
}

// matchesByName reports whether a visible rule's host can only be matched
// by a destination's name: a wildcard host other than the mesh-wide forms.
func (d *destRules) matchesByName() bool {
	return slices.ContainsFunc(d.visible, func(r *destRule) bool { return r.wildcard != "" && !r.meshWide })
}

type destView struct {
	Rule   string   `json:"rule"`
	Host   string   `json:"host"`
	Prefix string   `json:"prefix"`
	Port   uint16   `json:"port,omitempty"`
	Mode   string   `json:"tls_mode"`
	Mesh   bool     `json:"mesh_destinations_only,omitempty"`
	SNI    string   `json:"sni,omitempty"`
	SANs   []string `json:"subject_alt_names,omitempty"`
}

func (d *destRules) view() []destView {
	out := []destView{}
	for _, e := range d.entries {
		v := destView{Rule: e.rule.id(), Host: e.rule.host, Prefix: e.prefix.String(), Port: e.port, Mode: "DISABLE", Mesh: e.meshOnly()}
		if e.tls.mtls {
			v.Mode = "ISTIO_MUTUAL"
		}
		if e.tls.refuse {
			v.Mode = "REFUSE (rejected TLS origination rule)"
		}
		if o := e.tls.orig; o != nil {
			v.Mode = "SIMPLE"
			if o.Mutual {
				v.Mode = "MUTUAL"
			}
			v.SNI = o.SNI
		}
		for _, id := range e.tls.sans {
			v.SANs = append(v.SANs, id.String())
		}
		out = append(out, v)
	}
	return out
}
