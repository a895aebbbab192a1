package tlsmgr

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/metrics"
)

// DefaultBundleEndpointPath is the SPIFFE ID path of a meshproxy CA's
// serving certificate, which also serves its bundle endpoint: the endpoint
// SPIFFE ID a federation spec implies when it names none.
const DefaultBundleEndpointPath = "/ns/istio-system/sa/meshproxy-ca"

// Defaults of bundle fetching.
const (
	// DefaultFederationRefresh is the refresh interval when the endpoint's
	// bundle carries no refresh hint.
	DefaultFederationRefresh = 5 * time.Minute
	// MinFederationRefresh and MaxFederationRefresh bound the refresh hint
	// an endpoint may ask for.
	MinFederationRefresh = time.Second
	MaxFederationRefresh = 24 * time.Hour
	// DefaultFetchTimeout bounds one fetch.
	DefaultFetchTimeout = 30 * time.Second
	// maxBundleFileSize bounds a bootstrap bundle file.
	maxBundleFileSize = 4 << 20
)

// Bundle endpoint profiles of the SPIFFE Trust Domain and Bundle
// specification.
const (
	ProfileHTTPSSPIFFE = "https_spiffe"
	ProfileHTTPSWeb    = "https_web"
)

// FederationEndpoint is a foreign trust domain and where to fetch its bundle.
type FederationEndpoint struct {
	TrustDomain spiffeid.TrustDomain
	URL         string
	// EndpointID is the SPIFFE ID the endpoint's server must present
	// (profile https_spiffe); zero for https_web.
	EndpointID spiffeid.ID
	// Bootstrap authenticates the endpoint, and is trusted for the trust
	// domain, until the first bundle is fetched (https_spiffe only).
	Bootstrap *x509bundle.Bundle
	// BundleFile is where Bootstrap was read from, for messages.
	BundleFile string
}

// Profile names the endpoint's profile: https_spiffe or https_web.
func (e FederationEndpoint) Profile() string {
	if e.EndpointID.IsZero() {
		return ProfileHTTPSWeb
	}
	return ProfileHTTPSSPIFFE
}

// ParseFederationEndpoint parses one federation spec (the value of
// `meshproxy run --federate-with`):
//
//	TD=URL                              https_web: the endpoint's TLS certificate
//	                                    is checked against the system roots
//	TD=URL@BUNDLE-FILE                  https_spiffe: the endpoint presents the
//	                                    SVID spiffe://TD/ns/istio-system/sa/meshproxy-ca
//	                                    (a meshproxy CA), checked against BUNDLE-FILE
//	TD=URL#ENDPOINT-SPIFFE-ID@BUNDLE-FILE   https_spiffe with another endpoint ID
//
// URL is https. BUNDLE-FILE holds the trust domain's roots as PEM (its CA's
// root-cert.pem) or a SPIFFE bundle (JWKS, as SPIRE's `bundle show -format
// spiffe` prints); it bootstraps trust and is replaced by what the endpoint
// serves. The endpoint SPIFFE ID must be in TD. Only the syntax is checked
// here; LoadBootstrap reads the file.
func ParseFederationEndpoint(spec string) (FederationEndpoint, error) {
	var e FederationEndpoint
	tdStr, rest, ok := strings.Cut(spec, "=")
	if !ok || tdStr == "" || rest == "" {
		return e, fmt.Errorf("%q: want TD=URL, TD=URL@BUNDLE-FILE or TD=URL#ENDPOINT-SPIFFE-ID@BUNDLE-FILE", spec)
	}
	td, err := spiffeid.TrustDomainFromString(tdStr)
	if err != nil {
		return e, fmt.Errorf("%q: trust domain %q: %w", spec, tdStr, err)
	}
	e.TrustDomain = td
	rawURL, idStr, file := rest, "", ""
	if u, after, found := strings.Cut(rest, "#"); found {
		// A SPIFFE ID cannot contain '@', so the file starts at the first one.
		var hasFile bool
		rawURL = u
		idStr, file, hasFile = strings.Cut(after, "@")
		if !hasFile || file == "" {
			return e, fmt.Errorf("%q: an endpoint SPIFFE ID needs @BUNDLE-FILE with the trust domain's roots", spec)
		}
	} else if i := strings.LastIndex(rest, "@"); i >= 0 {
		rawURL, file = rest[:i], rest[i+1:]
		if file == "" {
			return e, fmt.Errorf("%q: empty BUNDLE-FILE after '@'", spec)
		}
	}
	u, err := url.Parse(rawURL)
	switch {
	case err != nil:
		return e, fmt.Errorf("%q: url %q: %w", spec, rawURL, err)
	case u.Scheme != "https" || u.Host == "":
		return e, fmt.Errorf("%q: url %q: want https://HOST[:PORT][/PATH]", spec, rawURL)
	case u.User != nil:
		return e, fmt.Errorf("%q: url %q: user information is not allowed", spec, rawURL)
	}
	e.URL = u.String()
	if file == "" {
		return e, nil
	}
	if idStr == "" {
		e.EndpointID, err = spiffeid.FromPath(td, DefaultBundleEndpointPath)
	} else {
		e.EndpointID, err = spiffeid.FromString(idStr)
	}
	if err != nil {
		return e, fmt.Errorf("%q: endpoint SPIFFE ID %q: %w", spec, idStr, err)
	}
	if !e.EndpointID.MemberOf(td) {
		return e, fmt.Errorf("%q: endpoint SPIFFE ID %s is not in trust domain %s", spec, e.EndpointID, td)
	}
	e.BundleFile = file
	return e, nil
}

// LoadBootstrap reads the bootstrap bundle from BundleFile, if one is named.
func (e *FederationEndpoint) LoadBootstrap() error {
	if e.BundleFile == "" {
		return nil
	}
	b, err := LoadBundleFile(e.TrustDomain, e.BundleFile)
	if err != nil {
		return fmt.Errorf("trust domain %s: %w", e.TrustDomain, err)
	}
	e.Bootstrap = b
	return nil
}

// LoadBundleFile reads td's roots from path: PEM certificates, or a SPIFFE
// bundle document (JWKS). Every root must be a CA certificate.
func LoadBundleFile(td spiffeid.TrustDomain, path string) (*x509bundle.Bundle, error) {
	data, err := fileread.Read(path, maxBundleFileSize)
	if err != nil {
		return nil, fmt.Errorf("bundle file: %w", err)
	}
	var roots []*x509.Certificate
	if trimmed := bytes.TrimSpace(data); bytes.HasPrefix(trimmed, []byte("{")) {
		b, err := spiffebundle.Parse(td, trimmed)
		if err != nil {
			return nil, fmt.Errorf("bundle file %s: %w", path, err)
		}
		roots = b.X509Authorities()
	} else if roots, err = ParseCertificatesPEM(data); err != nil {
		return nil, fmt.Errorf("bundle file %s: %w", path, err)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("bundle file %s: %w", path, ErrNoRoots)
	}
	if err := checkRoots(roots); err != nil {
		return nil, fmt.Errorf("bundle file %s: %w", path, err)
	}
	return x509bundle.FromX509Authorities(td, roots), nil
}

// FederationOption configures a Federated source.
type FederationOption func(*federationOptions)

type federationOptions struct {
	log        *slog.Logger
	refresh    time.Duration
	backoffMin time.Duration
	backoffMax time.Duration
	timeout    time.Duration
	webRoots   *x509.CertPool
}

// WithFederationLogger sets the logger (default: discard).
func WithFederationLogger(l *slog.Logger) FederationOption {
	return func(o *federationOptions) { o.log = l }
}

// WithFederationRefresh sets the refresh interval for bundles that carry no
// refresh hint (default DefaultFederationRefresh).
func WithFederationRefresh(d time.Duration) FederationOption {
	return func(o *federationOptions) { o.refresh = d }
}

// WithFederationBackoff sets the retry delay after a failed fetch: from min,
// doubling per failure up to max, jittered (default 1s → 5 min).
func WithFederationBackoff(min, max time.Duration) FederationOption {
	return func(o *federationOptions) { o.backoffMin, o.backoffMax = min, max }
}

// WithFetchTimeout bounds one fetch (default DefaultFetchTimeout).
func WithFetchTimeout(d time.Duration) FederationOption {
	return func(o *federationOptions) { o.timeout = d }
}

// WithWebPKIRoots checks https_web endpoints against roots instead of the
// system roots.
func WithWebPKIRoots(roots *x509.CertPool) FederationOption {
	return func(o *federationOptions) { o.webRoots = roots }
}

// Federated is a Source that adds the trust bundles of foreign trust domains
// to those of a local source. Each foreign bundle comes from its trust
// domain's SPIFFE bundle endpoint (fetched as go-spiffe's
// federation.FetchBundle does, but at most maxBundleFileSize bytes), is
// fetched again at its refresh hint, and, when a fetch fails, the last
// bundle stays (the failure is logged and counted, and retried with
// backoff). Until the first fetch succeeds an https_spiffe endpoint's
// bootstrap bundle is trusted.
//
// The SVID, certificate, readiness and renewal are the local source's; its
// own trust domains always win over a foreign bundle of the same name.
// Generation changes whenever the local source's or any foreign bundle
// changes. Accepting a peer of a foreign trust domain is a policy decision
// made elsewhere (an AuthorizationPolicy must name it).
type Federated struct {
	notifier
	local     Source
	endpoints []FederationEndpoint
	opts      federationOptions

	mu      sync.Mutex // serialises updates of foreign
	foreign atomic.Pointer[map[spiffeid.TrustDomain]*x509bundle.Bundle]
	gen     atomic.Uint64
}

var (
	_ Source   = (*Federated)(nil)
	_ Notifier = (*Federated)(nil)
)

// NewFederated returns local with the foreign trust domains of endpoints
// added. Nothing is fetched until Run.
func NewFederated(local Source, endpoints []FederationEndpoint, opts ...FederationOption) (*Federated, error) {
	if local == nil {
		return nil, errors.New("federation: local source is nil")
	}
	o := federationOptions{
		log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		refresh:    DefaultFederationRefresh,
		backoffMin: time.Second,
		backoffMax: 5 * time.Minute,
		timeout:    DefaultFetchTimeout,
	}
	for _, opt := range opts {
		opt(&o)
	}
	switch {
	case o.log == nil:
		return nil, errors.New("federation: logger is nil")
	case o.refresh < MinFederationRefresh:
		return nil, fmt.Errorf("federation: refresh %s below %s", o.refresh, MinFederationRefresh)
	case o.backoffMin <= 0 || o.backoffMax < o.backoffMin:
		return nil, fmt.Errorf("federation: backoff %s..%s: need 0 < min ≤ max", o.backoffMin, o.backoffMax)
	case o.timeout <= 0:
		return nil, fmt.Errorf("federation: fetch timeout %s must be positive", o.timeout)
	}
	f := &Federated{local: local, opts: o}
	seed := map[spiffeid.TrustDomain]*x509bundle.Bundle{}
	for _, e := range endpoints {
		if e.TrustDomain.IsZero() || e.URL == "" {
			return nil, errors.New("federation: endpoint without trust domain or URL")
		}
		if slices.ContainsFunc(f.endpoints, func(x FederationEndpoint) bool { return x.TrustDomain == e.TrustDomain }) {
			return nil, fmt.Errorf("federation: trust domain %s given twice", e.TrustDomain)
		}
		if !e.EndpointID.IsZero() && (e.Bootstrap == nil || e.Bootstrap.Empty()) {
			return nil, fmt.Errorf("federation: %s: https_spiffe endpoint without a bootstrap bundle", e.TrustDomain)
		}
		f.endpoints = append(f.endpoints, e)
		metrics.FederationFetches.WithLabelValues(e.TrustDomain.Name(), "success")
		metrics.FederationFetches.WithLabelValues(e.TrustDomain.Name(), "failure")
		if e.Bootstrap != nil {
			seed[e.TrustDomain] = x509bundle.FromX509Authorities(e.TrustDomain, e.Bootstrap.X509Authorities())
		}
	}
	f.foreign.Store(&seed)
	return f, nil
}

// GetX509SVID implements x509svid.Source.
func (f *Federated) GetX509SVID() (*x509svid.SVID, error) { return f.local.GetX509SVID() }

// GetX509BundleForTrustDomain implements x509bundle.Source: the local
// source's bundle if it has one for td, else the foreign bundle.
func (f *Federated) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := f.local.GetX509BundleForTrustDomain(td)
	if err == nil {
		return b, nil
	}
	if fb, ok := (*f.foreign.Load())[td]; ok {
		return fb, nil
	}
	return nil, err
}

// Certificate implements Source; it is the local source's, allocation-free.
func (f *Federated) Certificate() (*tls.Certificate, error) { return f.local.Certificate() }

// Generation implements Source: it grows with every change of the local
// source and of any foreign bundle.
func (f *Federated) Generation() uint64 { return f.local.Generation() + f.gen.Load() }

// Ready implements Source: the local identity's readiness. A foreign
// bundle that cannot be fetched does not make the workload unready.
func (f *Federated) Ready() error { return f.local.Ready() }

// Rotate implements Source: it renews the local identity.
func (f *Federated) Rotate(ctx context.Context) error { return f.local.Rotate(ctx) }

// Status implements Source: the local status with the foreign bundles
// added to its trust domains.
func (f *Federated) Status() Status {
	st := f.local.Status()
	foreign := *f.foreign.Load()
	tds := make([]spiffeid.TrustDomain, 0, len(foreign))
	for td := range foreign {
		if !slices.Contains(st.TrustDomains, td) {
			tds = append(tds, td)
		}
	}
	slices.SortFunc(tds, func(a, b spiffeid.TrustDomain) int { return strings.Compare(a.Name(), b.Name()) })
	st.TrustDomains = slices.Clone(st.TrustDomains)
	st.Bundles = slices.Clone(st.Bundles)
	for _, td := range tds {
		st.TrustDomains = append(st.TrustDomains, td)
		st.Bundles = append(st.Bundles, foreign[td])
	}
	return st
}

// Run keeps every foreign bundle fresh and runs the local source's own
// loop, if it has one (Rotator, FileSource, WorkloadAPISource), until ctx
// ends or that loop returns.
func (f *Federated) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	if n, ok := f.local.(Notifier); ok {
		ch, unsubscribe := n.Subscribe()
		wg.Go(func() {
			defer unsubscribe()
			for {
				select {
				case <-ctx.Done():
					return
				case <-ch:
					f.notify()
				}
			}
		})
	}
	for _, e := range f.endpoints {
		f.opts.log.Info("federating", "trust_domain", e.TrustDomain.Name(), "url", e.URL, "profile", e.Profile(),
			"endpoint_spiffe_id", e.EndpointID.String(), "bootstrap_bundle", e.BundleFile)
		wg.Go(func() { f.watch(ctx, e) })
	}
	if r, ok := f.local.(interface{ Run(context.Context) error }); ok {
		return r.Run(ctx)
	}
	<-ctx.Done()
	return nil
}

// watch fetches e's bundle at its refresh hint until ctx ends.
func (f *Federated) watch(ctx context.Context, e FederationEndpoint) {
	failures := 0
	for {
		wait, err := f.fetch(ctx, e)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			wait = backoff(f.opts.backoffMin, f.opts.backoffMax, failures, mrand.Float64())
			keeping := "none"
			if _, ok := (*f.foreign.Load())[e.TrustDomain]; ok {
				keeping = "last bundle"
			}
			metrics.FederationFetches.WithLabelValues(e.TrustDomain.Name(), "failure").Inc()
			f.opts.log.Warn("federated bundle fetch failed", "trust_domain", e.TrustDomain.Name(), "url", e.URL,
				"err", err.Error(), "failures", failures, "keeping", keeping, "retry_in", wait.Round(time.Millisecond).String())
		} else {
			failures = 0
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// fetch gets e's bundle once, stores it if it changed, and returns when to
// fetch next.
func (f *Federated) fetch(ctx context.Context, e FederationEndpoint) (time.Duration, error) {
	// The same transport go-spiffe's federation.FetchBundle builds, but the
	// document is read up to a limit: the endpoint is trusted for its trust
	// domain's roots, not with this process's memory.
	transport := http.DefaultTransport.(*http.Transport).Clone()
	defer transport.CloseIdleConnections()
	if !e.EndpointID.IsZero() {
		// The endpoint is authenticated with the bundle trusted now, so it
		// can move to a new root during its own root rotation.
		cur, ok := (*f.foreign.Load())[e.TrustDomain]
		if !ok {
			cur = e.Bootstrap
		}
		transport.TLSClientConfig = tlsconfig.TLSClientConfig(cur, tlsconfig.AuthorizeID(e.EndpointID))
	} else if f.opts.webRoots != nil {
		transport.TLSClientConfig = &tls.Config{RootCAs: f.opts.webRoots, MinVersion: tls.VersionTLS12}
	}
	fctx, cancel := context.WithTimeout(ctx, f.opts.timeout)
	defer cancel()
	b, err := fetchBundle(fctx, &http.Client{Transport: transport}, e.TrustDomain, e.URL)
	if err != nil {
		return 0, err
	}
	xb := b.X509Bundle()
	if xb.Empty() {
		return 0, errors.New("the endpoint's bundle holds no X.509 authorities")
	}
	if err := checkRoots(xb.X509Authorities()); err != nil {
		return 0, fmt.Errorf("the endpoint's bundle: %w", err)
	}
	metrics.FederationFetches.WithLabelValues(e.TrustDomain.Name(), "success").Inc()
	metrics.FederationLastSuccess.WithLabelValues(e.TrustDomain.Name()).SetToCurrentTime()
	refresh := f.opts.refresh
	if hint, ok := b.RefreshHint(); ok && hint > 0 {
		refresh = min(max(hint, MinFederationRefresh), MaxFederationRefresh)
	}
	f.store(e.TrustDomain, xb, refresh)
	// Spread clients that started together.
	return refresh - time.Duration(mrand.Float64()*0.1*float64(refresh)), nil
}

// fetchBundle GETs the SPIFFE bundle document of td at url and parses it;
// a document larger than maxBundleFileSize is refused unread.
func fetchBundle(ctx context.Context, client *http.Client, td spiffeid.TrustDomain, url string) (*spiffebundle.Bundle, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, http.NoBody)
	if err != nil {
		return nil, fmt.Errorf("federation: could not create request: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("federation: could not GET bundle: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBundleFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("federation: read bundle: %w", err)
	}
	if len(data) > maxBundleFileSize {
		return nil, fmt.Errorf("federation: bundle document larger than %d bytes", maxBundleFileSize)
	}
	b, err := spiffebundle.Parse(td, data)
	if err != nil {
		return nil, fmt.Errorf("federation: %w", err)
	}
	return b, nil
}

// store installs b as td's bundle if it differs from the current one.
func (f *Federated) store(td spiffeid.TrustDomain, b *x509bundle.Bundle, refresh time.Duration) {
	f.mu.Lock()
	old := *f.foreign.Load()
	if cur, ok := old[td]; ok && cur.Equal(b) {
		f.mu.Unlock()
		return
	}
	next := make(map[spiffeid.TrustDomain]*x509bundle.Bundle, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[td] = b
	f.foreign.Store(&next)
	gen := f.gen.Add(1)
	f.mu.Unlock()
	f.opts.log.Info("federated bundle updated", "trust_domain", td.Name(), "roots", len(b.X509Authorities()),
		"refresh", refresh.String(), "generation", f.Generation(), "foreign_generation", gen)
	f.notify()
}
