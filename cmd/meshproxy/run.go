package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fdlimit"
	"github.com/meshproxy/meshproxy/internal/ports"
	goprocs "github.com/meshproxy/meshproxy/internal/procs"
	"github.com/meshproxy/meshproxy/internal/serve"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/proxy"
	"github.com/meshproxy/meshproxy/proxy/admin"
	"github.com/meshproxy/meshproxy/proxy/apphealth"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/meshproxy/meshproxy/tlsmgr/caclient"
)

// identityFlags choose the identity source; run and gateway share them.
type identityFlags struct {
	caAddr, caRoot, tokenFile, caServerName string
	caSPIFFEID                              string
	workloadAPI                             string
	certFile, keyFile, bundleFile           string
	certTTL                                 time.Duration
}

// register adds the identity-source flags to fl.
func (f *identityFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.caAddr, "ca-addr", "", "CA gRPC address HOST:PORT (meshproxy ca serve or istiod)")
	fl.StringVar(&f.caRoot, "ca-root", "", "PEM root(s) that sign the CA's serving certificate")
	fl.StringVar(&f.tokenFile, "token-file", "", "bearer token file sent to the CA (re-read on every request)")
	fl.StringVar(&f.caServerName, "ca-server-name", "", "name expected in the CA's certificate (default: the host of --ca-addr)")
	fl.StringVar(&f.caSPIFFEID, "ca-spiffe-id", "", "SPIFFE ID to name in every CSR to --ca-addr (needed by a CA with --signer certmanager, which signs the CSR as it is); the CA still decides the identity")
	fl.DurationVar(&f.certTTL, "cert-ttl", 0, "certificate lifetime to request from the CA (0: the CA's default)")
	fl.StringVar(&f.workloadAPI, "workload-api", "", "SPIFFE Workload API address, e.g. unix:///run/spire/agent.sock")
	fl.StringVar(&f.certFile, "cert-file", "", "PEM certificate chain (leaf first) of a mounted SVID")
	fl.StringVar(&f.keyFile, "key-file", "", "PEM private key of the mounted SVID")
	fl.StringVar(&f.bundleFile, "bundle-file", "", "PEM trust bundle (one or more roots); with --ca-addr, roots added to the CA's")
}

// runFlags are the flags of `meshproxy run`.
type runFlags struct {
	identityFlags
	serveFlags

	inbound, outbound string
	inboundExplicit   []string
	outboundExplicit  []string
	meshCIDRs         []string
	configDir, mode   string
	strictConfig      bool
	credentialsDir    string
	namespace         string
	labelsFile        string
	rootNamespace     string
	trustDomain       string
	federateWith      []string
	tproxy            bool
	hbone             hboneFlag
	hboneListen       string
	hbonePeers        []string
	keyExchange       string
	appProbers        string
	configServer      configServerFlags
	concurrency       concurrencyFlag
}

// hboneFlag is --hbone: auto, always or never. The boolean spellings of
// the flag it replaces still parse: --hbone alone or =true is always,
// =false is never.
type hboneFlag struct{ mode proxy.HBONEMode }

func (h *hboneFlag) String() string { return string(h.mode) }

// Type names the values in --help.
func (h *hboneFlag) Type() string { return "auto|always|never" }

// Set parses a value.
func (h *hboneFlag) Set(v string) error {
	switch v = strings.ToLower(strings.TrimSpace(v)); v {
	case "true", "1":
		h.mode = proxy.HBONEAlways
		return nil
	case "false", "0":
		h.mode = proxy.HBONENever
		return nil
	}
	m, err := proxy.ParseHBONEMode(v)
	if err != nil {
		return err
	}
	h.mode = m
	return nil
}

func newRunCmd() *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run the sidecar: mesh mTLS with a rotating SPIFFE identity, policy, capture listeners",
		Long: `run is the sidecar. It holds the workload's SPIFFE identity, terminates and
originates mesh mTLS, enforces STRICT / PERMISSIVE / DISABLE and L4
AuthorizationPolicy from Istio YAML, and forwards bytes.

Identity, exactly one of:
  --ca-addr HOST:PORT --ca-root FILE --token-file FILE
        a key is generated in memory, a CSR is sent to meshproxy ca (or istiod)
        with the bearer token from FILE (re-read on every request), and the
        certificate is renewed at half its lifetime
  --workload-api unix:///PATH
        SVIDs and bundles from a SPIRE agent or any SPIFFE Workload API
  --cert-file F --key-file F --bundle-file F
        mounted files, reloaded when they change

Listeners (at least one):
  --inbound :15006 / --outbound :15001      transparent, behind 'meshproxy redirect'
  --inbound-explicit LISTEN=APP_ADDR         terminate mesh mTLS, forward to the app
  --outbound-explicit LISTEN=DEST[#SPIFFE-ID] plaintext in, mesh mTLS to DEST

HBONE (HTTP/2 CONNECT streams over pooled mesh mTLS connections), --hbone:
  auto (default)  offer ALPN meshproxy-hbone on each new mesh connection; a
                  meshproxy peer selects it and the connection is pooled for
                  later app connections to the same destination; an
                  Envoy/Istio peer does not, and the connection stays
                  per-connection mTLS. Inbound, the offer is accepted.
  always          send outbound mesh traffic as CONNECT streams to the
                  destination's port 15008 (or --hbone-peer DEST=HBONE_ADDR),
                  Istio's HBONE format, no fallback; listen on --hbone-listen
  never           per-connection mTLS only; the offer is not accepted
A stream's :authority must be one of this workload's inbound listeners or
apps (explicit), or the pod address it arrived on (transparent; never
loopback or ports 15000-15099), and the same PeerAuthentication and
AuthorizationPolicy as on the other inbound paths apply.
--tls-key-exchange picks the key exchange of mesh TLS: hybrid-pq (default,
X25519MLKEM768) or x25519 (cheaper handshakes, no post-quantum protection).

--concurrency N is how many threads run the sidecar's Go code at once
(GOMAXPROCS). Not given (auto), the sidecar follows its load: one thread
while it uses less than 0.85 of a CPU and moves no bulk data, 2 (or the CPUs
the runtime saw, if fewer) from the next 200 ms on, back to one after 2 s
under 0.6 without bulk data. Bulk data is reads of 32 MB/s or more averaging
16 KiB or more (/proc/self/io): a download's copy runs without waiting, and
with one thread the other connections would wait for it (without
/proc/self/io the sidecar keeps 2). A second thread that is mostly idle
costs a wake-up per burst: with one, kept-connection requests ran at 1.1x
the rate for 0.9x the CPU. A fixed N turns following off (2 is Istio's
sidecar concurrency); 0 is the Go runtime's choice ($GOMAXPROCS, else the
container's CPU limit or all CPUs). When the count to start with differs
from the one the runtime started with and $GOMAXPROCS is unset, run
re-executes itself once at start with GOMAXPROCS set (the runtime keeps
memory that processors it gives up took: 2.5 MB from 64 down to 2).

With --tproxy the inbound listener is transparent (IP_TRANSPARENT) and the
proxy connects to the app from the client's own address, so the app sees the
real client as its peer. It must match 'meshproxy redirect install --tproxy'
(TPROXY capture, and the mark 0x539 that routes the app's replies back to the
proxy), and the sidecar needs CAP_NET_ADMIN (IP_TRANSPARENT, SO_MARK): as uid
1337 an ambient capability, in Kubernetes securityContext.capabilities.add:
[NET_ADMIN].

The admin API (127.0.0.1 only), Prometheus metrics and the readiness endpoint
run beside them. SIGTERM stops accepting and lets open connections finish for
up to --drain-timeout.

With --ca-addr the sidecar also watches --ca-root: when the CA's published
roots change (a root rotation), it renews at once (within a few seconds of
jitter) and so trusts a new root, or stops trusting a retired one, without
waiting for the next scheduled renewal.

Federation: --federate-with TD=URL... (repeatable, or comma-separated) adds the
trust bundle of a foreign trust domain, fetched from its SPIFFE bundle endpoint
and refreshed at its refresh hint (a failed fetch keeps the last bundle):
  TD=URL@BUNDLE-FILE                     https_spiffe; the endpoint presents
        spiffe://TD/ns/istio-system/sa/meshproxy-ca (a meshproxy CA's
        --bundle-endpoint); BUNDLE-FILE (PEM roots, e.g. that CA's
        root-cert.pem, or a SPIFFE bundle JSON) authenticates it the first time
  TD=URL#ENDPOINT-SPIFFE-ID@BUNDLE-FILE  https_spiffe with another endpoint ID
  TD=URL                                 https_web; the endpoint's certificate
        is checked against the system roots
A peer of a foreign trust domain is accepted inbound only when an ALLOW
AuthorizationPolicy names its trust domain in a principal (e.g.
"other.org/ns/web/sa/client" or "other.org/*"); otherwise it is refused with
reason foreign_trust_domain. Outbound, a foreign server must be named by its
SPIFFE ID (--outbound-explicit ...#spiffe://other.org/... or a DestinationRule's
subjectAltNames).` + runConfigServerHelp,
		Example: `  meshproxy run --ca-addr 127.0.0.1:15012 --ca-root root-cert.pem --token-file token \
      --inbound-explicit :8443=127.0.0.1:8080 --mode STRICT
  meshproxy run --cert-file svid.pem --key-file key.pem --bundle-file bundle.pem \
      --outbound-explicit 127.0.0.1:9000=10.0.0.7:8443#spiffe://cluster.local/ns/web/sa/api`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runSidecar(cmd.Context(), &f, cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	f.identityFlags.register(fl)
	fl.StringVar(&f.inbound, "inbound", "", "transparent inbound listener, e.g. :15006 (needs 'meshproxy redirect')")
	fl.StringVar(&f.outbound, "outbound", "", "transparent outbound listener, e.g. :15001 (needs 'meshproxy redirect')")
	fl.StringArrayVar(&f.inboundExplicit, "inbound-explicit", nil, "LISTEN=APP_ADDR: terminate mesh mTLS on LISTEN, forward to APP_ADDR (repeatable)")
	fl.StringArrayVar(&f.outboundExplicit, "outbound-explicit", nil, "LISTEN=DEST[#SPIFFE-ID]: plaintext on LISTEN, mesh mTLS to DEST (repeatable)")
	f.hbone.mode = proxy.HBONEAuto
	fl.Var(&f.hbone, "hbone", "HBONE: auto (negotiated with meshproxy peers on the mesh connection, per-connection mTLS with others), always (CONNECT to the peer's port 15008, no fallback) or never; --hbone alone is always")
	fl.Lookup("hbone").NoOptDefVal = string(proxy.HBONEAlways)
	fl.StringVar(&f.hboneListen, "hbone-listen", ports.Any(ports.HBONE), "with --hbone=always: the inbound HBONE listener address ('off': outbound HBONE only)")
	fl.StringArrayVar(&f.hbonePeers, "hbone-peer", nil, "with --hbone=always: DEST=HBONE_ADDR, the peer HBONE listener for destination DEST when it is not DEST's host port 15008 (repeatable)")
	fl.StringVar(&f.keyExchange, "tls-key-exchange", string(mesh.KeyExchangeHybridPQ), "key exchange of mesh TLS: hybrid-pq (X25519MLKEM768, X25519 for peers without it) or x25519 (about a quarter cheaper handshakes, no post-quantum protection)")
	f.concurrency.n = defaultConcurrency
	fl.Var(&f.concurrency, "concurrency", "threads running Go code at once (GOMAXPROCS); auto: 1, up to 2 while the load needs more than one CPU or moves bulk data; 0: the Go runtime's choice ($GOMAXPROCS, else the CPU limit or all CPUs); see above")
	fl.BoolVar(&f.tproxy, "tproxy", false, "inbound capture is TPROXY: listen transparently and reach the app from the client's address (must match 'redirect install --tproxy'; needs CAP_NET_ADMIN)")
	fl.StringSliceVar(&f.meshCIDRs, "mesh-cidrs", nil, "outbound destinations that get mesh mTLS unless a DestinationRule says otherwise")
	fl.StringVar(&f.configDir, "config-dir", "", "directory of Istio policy YAML (PeerAuthentication, AuthorizationPolicy, DestinationRule), watched")
	fl.StringVar(&f.credentialsDir, "credentials-dir", "", "directory of DestinationRule tls.credentialName files for TLS origination: NAME.crt, NAME.key, NAME-ca.crt")
	fl.BoolVar(&f.strictConfig, "strict-config", false, "refuse to start (and keep the last good policy on reload) when any --config-dir document is rejected; by default a rejected document is reported and fails closed alone")
	f.configServer.register(fl)
	fl.StringVar(&f.mode, "mode", "PERMISSIVE", "mesh-wide mTLS mode when no PeerAuthentication applies: STRICT, PERMISSIVE or DISABLE")
	fl.StringVar(&f.namespace, "namespace", "", "the workload's namespace, for policy selection (default: NS of an SVID spiffe://TD/ns/NS/sa/SA, else \"default\")")
	fl.StringVar(&f.labelsFile, "labels-file", "", "the workload's labels, Kubernetes downward-API format (key=\"value\" lines)")
	fl.StringVar(&f.rootNamespace, "root-namespace", "istio-system", "namespace whose policies apply mesh-wide")
	fl.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of the mesh (default: that of the workload's SVID)")
	f.serveFlags.register(fl, "how long inbound waits for a client's first bytes before treating it as plaintext")
	fl.StringVar(&f.appProbers, "app-probers", "", "JSON of the application's original probes, served on the health port at /app-health/CONTAINER/livez|readyz|startupz (written by 'meshproxy inject')")
	fl.StringSliceVar(&f.federateWith, "federate-with", nil, "TD=URL[#ENDPOINT-SPIFFE-ID][@BUNDLE-FILE]: trust the foreign trust domain TD, its bundle fetched from its bundle endpoint URL (repeatable; see above)")
	return cmd
}

// newLogger builds the process logger, writing to w, from --log-level and
// --log-format.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usagef("--log-format %q: want text or json", format)
}

func runSidecar(ctx context.Context, f *runFlags, logTo io.Writer) error {
	log, err := newLogger(logTo, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	// First, before anything is said or opened: the Go runtime sized its
	// scheduler at start, so a different --concurrency restarts the process
	// with GOMAXPROCS set (see startCount). Where that fails, apply below
	// lowers it at run time.
	if restart, ok := ctx.Value(restartKey{}).(restartFunc); ok {
		started := runtime.GOMAXPROCS(0)
		if n, need := f.concurrency.startCount(os.Getenv, started); need {
			if err := restart(n, started); err != nil {
				log.Debug("go scheduler not sized at start", "err", err)
			}
		}
	}
	popts, err := f.proxyOptions(log)
	if err != nil {
		return err
	}
	mode, err := policy.ParseMode(f.mode)
	if err != nil || mode == policy.ModeUnset {
		return usagef("--mode %q: want STRICT, PERMISSIVE or DISABLE", f.mode)
	}
	if err := checkServerAddrs(f.admin, f.metrics, f.health); err != nil {
		return err
	}
	td, err := parseTrustDomain(f.trustDomain)
	if err != nil {
		return err
	}
	if !td.IsZero() {
		popts = append(popts, proxy.WithTrustDomain(td))
	}
	ns := f.namespace
	if ns == "" {
		ns = defaultNamespace // until the SVID says otherwise
	}
	wl, err := workload(ns, f.labelsFile)
	if err != nil {
		return err
	}

	feds, err := parseFederateWith(f.federateWith)
	if err != nil {
		return err
	}
	if err := f.configServer.validate(f.configDir); err != nil {
		return err
	}
	probers, err := apphealth.Parse([]byte(f.appProbers))
	if err != nil {
		return usagef("--app-probers (env MESHPROXY_APP_PROBERS): %v", err)
	}
	f.appHealth = apphealth.New(probers, apphealth.WithLogger(log))

	polOpts := policyOptions(f.rootNamespace, td, log, policy.WithDefaultMode(mode), policy.WithStrictConfig(f.strictConfig), f.policyResolver())
	// Last, once every flag is valid (tests run the usage errors in process).
	procs, procsFrom, follow := f.concurrency.apply(os.Getenv)
	log.Debug("go scheduler", "concurrency", procs, "from", procsFrom, "up_to", follow)
	if follow > 1 {
		pf := &goprocs.Follower{Max: follow, OnChange: func(from, to int, s goprocs.Sample) {
			log.Debug("go scheduler resized", "concurrency", to, "was", from, "cpu_used", fmt.Sprintf("%.2f", s.CPUs), "bulk", s.Bulk)
		}}
		go func() {
			if !pf.Run(ctx) && ctx.Err() == nil {
				log.Info("go scheduler not following the load: no read counters (/proc/self/io) to tell a download from idle time", "concurrency", follow)
			}
		}()
	}
	return f.start(ctx, &f.identityFlags, td, feds, log, "sidecar started", func(ctx context.Context, src tlsmgr.Source) (serve.Built, error) {
		if err := f.configServer.follow(ctx, src, td, f.configDir, log); err != nil {
			return serve.Built{}, err
		}
		var store mesh.PolicySource
		switch {
		case f.configDir == "":
			store = policy.Static(wl, polOpts...)
		case f.namespace == "":
			var err error
			if store, err = watchPolicyForSVID(ctx, src, f.configDir, wl, f.rootNamespace, polOpts, log); err != nil {
				return serve.Built{}, err
			}
		default:
			warnForeignPolicies(log, f.configDir, f.namespace, f.rootNamespace)
			var err error
			if store, err = watchPolicy(ctx, f.configDir, wl, polOpts, log); err != nil {
				return serve.Built{}, err
			}
		}
		p := proxy.New(src, store, popts...)
		if err := p.Start(ctx); err != nil {
			return serve.Built{}, err
		}
		return serve.Built{Plane: p, Attrs: []any{"listeners", listenerNames(p)}}, nil
	})
}

// proxyOptions validates the listener flags and turns them into options.
func (f *runFlags) proxyOptions(log *slog.Logger) ([]proxy.Option, error) {
	if err := f.serveFlags.validate(); err != nil { // sizes --max-connections
		return nil, err
	}
	opts := []proxy.Option{
		proxy.WithLogger(log),
		proxy.WithDetectTimeout(f.detectTimeout),
		proxy.WithIdleTimeout(f.idleTimeout),
		proxy.WithMaxConnections(f.maxConnections),
		proxy.WithOriginalDst(redirect.OriginalDst),
		proxy.WithCredentialsDir(f.credentialsDir),
		proxy.WithDialer(f.dialer()),
	}
	n := 0
	if f.inbound != "" {
		if _, _, err := net.SplitHostPort(f.inbound); err != nil {
			return nil, usagef("--inbound %q: %v", f.inbound, err)
		}
		opts = append(opts, proxy.WithInboundTransparent(f.inbound))
		n++
	}
	if f.tproxy {
		if f.inbound == "" {
			return nil, usagef("--tproxy needs --inbound (the transparent inbound listener, e.g. :15006)")
		}
		opts = append(opts, proxy.WithInboundListen(redirect.ListenTransparent),
			proxy.WithInboundDialer(func(ctx context.Context, client netip.AddrPort, _, addr string) (net.Conn, error) {
				return redirect.DialTransparent(ctx, client, addr, redirect.DefaultTProxyMark)
			}))
	}
	if f.outbound != "" {
		if _, _, err := net.SplitHostPort(f.outbound); err != nil {
			return nil, usagef("--outbound %q: %v", f.outbound, err)
		}
		opts = append(opts, proxy.WithOutboundTransparent(f.outbound))
		n++
	}
	for _, v := range f.inboundExplicit {
		listen, app, ok := strings.Cut(v, "=")
		if !ok || !isHostPort(listen) || !isHostPort(app) {
			return nil, usagef("--inbound-explicit %q: want LISTEN=APP_ADDR, e.g. :8443=127.0.0.1:8080", v)
		}
		opts = append(opts, proxy.WithInboundExplicit(listen, app))
		n++
	}
	for _, v := range f.outboundExplicit {
		listen, rest, ok := strings.Cut(v, "=")
		dest, idStr, hasID := strings.Cut(rest, "#")
		if !ok || !isHostPort(listen) || !isHostPort(dest) {
			return nil, usagef("--outbound-explicit %q: want LISTEN=DEST[#SPIFFE-ID], e.g. 127.0.0.1:9000=10.0.0.7:8443", v)
		}
		var id spiffeid.ID
		if hasID {
			var err error
			if id, err = spiffeid.FromString(idStr); err != nil {
				return nil, usagef("--outbound-explicit %q: SPIFFE ID %q: %v", v, idStr, err)
			}
		}
		opts = append(opts, proxy.WithOutboundExplicit(listen, dest, id))
		n++
	}
	hboneOpts, err := f.hboneOptions()
	if err != nil {
		return nil, err
	}
	opts = append(opts, hboneOpts...)
	if n == 0 {
		return nil, usagef("no listener: give --inbound, --outbound, --inbound-explicit or --outbound-explicit")
	}
	var cidrs []netip.Prefix
	for _, c := range f.meshCIDRs {
		p, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil {
			return nil, usagef("--mesh-cidrs %q: %v", c, err)
		}
		cidrs = append(cidrs, p.Masked())
	}
	if len(cidrs) > 0 {
		opts = append(opts, proxy.WithMeshCIDRs(cidrs))
	}
	return opts, nil
}

// hboneOptions validates --hbone, --hbone-listen, --hbone-peer and
// --tls-key-exchange.
func (f *runFlags) hboneOptions() ([]proxy.Option, error) {
	kx, err := mesh.ParseKeyExchange(f.keyExchange)
	if err != nil {
		return nil, usagef("--tls-key-exchange: %v", err)
	}
	opts := []proxy.Option{proxy.WithKeyExchange(kx), proxy.WithHBONEMode(f.hbone.mode)}
	if f.hbone.mode != proxy.HBONEAlways {
		if len(f.hbonePeers) > 0 {
			return nil, usagef("--hbone-peer needs --hbone=always")
		}
		return opts, nil
	}
	switch {
	case f.hboneListen == "off":
	case isHostPort(f.hboneListen):
		opts = append(opts, proxy.WithHBONE(f.hboneListen))
	default:
		return nil, usagef("--hbone-listen %q: want HOST:PORT, e.g. :15008, or 'off'", f.hboneListen)
	}
	for _, v := range f.hbonePeers {
		dest, addr, ok := strings.Cut(v, "=")
		if !ok || !isHostPort(dest) || !isHostPort(addr) {
			return nil, usagef("--hbone-peer %q: want DEST=HBONE_ADDR, e.g. 10.0.0.7:8443=10.0.0.7:15008", v)
		}
		opts = append(opts, proxy.WithHBONEPeer(dest, addr))
	}
	return opts, nil
}

// identitySource builds the one identity source the flags name.
func (f *identityFlags) identitySource(ctx context.Context, td spiffeid.TrustDomain, log *slog.Logger) (serve.Source, error) {
	caSet := f.caAddr != "" || f.caRoot != "" || f.tokenFile != ""
	fileSet := f.certFile != "" || f.keyFile != ""
	wlSet := f.workloadAPI != ""
	count := 0
	for _, b := range []bool{caSet, fileSet, wlSet} {
		if b {
			count++
		}
	}
	if count != 1 {
		return nil, usagef("give exactly one identity source: --ca-addr/--ca-root/--token-file, --workload-api, or --cert-file/--key-file/--bundle-file")
	}
	if f.caSPIFFEID != "" && !caSet {
		return nil, usagef("--ca-spiffe-id is for the CA identity source (--ca-addr)")
	}
	var topts []tlsmgr.Option
	topts = append(topts, tlsmgr.WithLogger(log))
	if !td.IsZero() {
		topts = append(topts, tlsmgr.WithTrustDomain(td))
	}
	switch {
	case caSet:
		if f.caAddr == "" || f.caRoot == "" || f.tokenFile == "" {
			return nil, usagef("--ca-addr, --ca-root and --token-file go together")
		}
		if !isHostPort(f.caAddr) {
			return nil, usagef("--ca-addr %q: want HOST:PORT", f.caAddr)
		}
		if _, err := os.Stat(f.tokenFile); err != nil {
			return nil, fmt.Errorf("--token-file: %w", err)
		}
		var rot *tlsmgr.Rotator
		copts := []caclient.Option{
			caclient.WithRootFile(f.caRoot),
			caclient.WithTokenFile(f.tokenFile),
			caclient.WithClientCertificate(func() (*tls.Certificate, error) { return rot.Certificate() }),
		}
		if f.caServerName != "" {
			copts = append(copts, caclient.WithServerName(f.caServerName))
		}
		client, err := caclient.New(f.caAddr, copts...)
		if err != nil {
			return nil, fmt.Errorf("--ca-addr %s: %w", f.caAddr, err)
		}
		if f.certTTL > 0 {
			topts = append(topts, tlsmgr.WithTTL(f.certTTL))
		}
		if f.caSPIFFEID != "" {
			id, err := spiffeid.FromString(f.caSPIFFEID)
			if err != nil {
				return nil, usagef("--ca-spiffe-id %q: %v", f.caSPIFFEID, err)
			}
			topts = append(topts, tlsmgr.WithID(id))
		}
		if f.bundleFile != "" {
			topts = append(topts, tlsmgr.WithBundleFile(f.bundleFile))
		}
		rot, err = tlsmgr.NewRotator(client, topts...)
		if err != nil {
			return nil, err
		}
		return tlsmgr.WatchRoots(rot, f.caRoot), nil
	case wlSet:
		return newWorkloadAPISource(ctx, f.workloadAPI, topts)
	default:
		if f.certFile == "" || f.keyFile == "" || f.bundleFile == "" {
			return nil, usagef("--cert-file, --key-file and --bundle-file go together")
		}
		return tlsmgr.NewFileSource(f.certFile, f.keyFile, f.bundleFile, topts...)
	}
}

// parseTrustDomain parses --trust-domain; empty gives the zero value.
func parseTrustDomain(s string) (spiffeid.TrustDomain, error) {
	if s == "" {
		return spiffeid.TrustDomain{}, nil
	}
	td, err := spiffeid.TrustDomainFromString(s)
	if err != nil {
		return spiffeid.TrustDomain{}, usagef("--trust-domain %q: %v", s, err)
	}
	return td, nil
}

// checkServerAddrs validates --admin (loopback only), --metrics and --health.
func checkServerAddrs(admin, metrics, health string) error {
	if err := checkLoopback("--admin", admin); err != nil {
		return err
	}
	for _, a := range []struct{ flag, v string }{{"--metrics", metrics}, {"--health", health}} {
		if a.v != "off" {
			if _, _, err := net.SplitHostPort(a.v); err != nil {
				return usagef("%s %q: want HOST:PORT or 'off': %v", a.flag, a.v, err)
			}
		}
	}
	return nil
}

func isHostPort(s string) bool {
	_, port, err := net.SplitHostPort(s)
	return err == nil && port != ""
}

// checkLoopback refuses an admin address that is not loopback-only.
func checkLoopback(flag, addr string) error {
	if addr == "off" {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return usagef("%s %q: want HOST:PORT: %v", flag, addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.IsLoopback() {
		return usagef("%s %q: the admin API binds to a loopback address only (e.g. 127.0.0.1:15000)", flag, addr)
	}
	return nil
}

// serveFlags are the flags run and gateway share: the admin, metrics and
// health endpoints, connection timeouts and limit, draining, logging, and
// the DNS server asked for host names.
type serveFlags struct {
	admin, metrics, health string
	detectTimeout          time.Duration
	idleTimeout            time.Duration
	drainTimeout           time.Duration
	rotateInterval         time.Duration
	maxConnections         int
	logLevel, logFormat    string
	dnsServer              string

	resolver  *net.Resolver      // of --dns-server, set by validate; nil: the system's
	nofile    uint64             // soft RLIMIT_NOFILE after raising it, set by validate
	nofileErr error              // why it could not be raised
	appHealth *apphealth.Handler // run only: the app's probes on the health port
}

// register adds the shared flags to fl; detectUsage says what
// --detect-timeout bounds for this command.
func (f *serveFlags) register(fl *pflag.FlagSet, detectUsage string) {
	fl.StringVar(&f.admin, "admin", "127.0.0.1:15000", "admin API address; must be a loopback address ('off' disables)")
	fl.StringVar(&f.metrics, "metrics", ":15020", "Prometheus metrics address ('off' disables)")
	fl.StringVar(&f.health, "health", ":15021", "readiness endpoint address, /healthz/ready ('off' disables)")
	fl.DurationVar(&f.detectTimeout, "detect-timeout", mesh.DefaultDetectTimeout, detectUsage)
	fl.DurationVar(&f.idleTimeout, "idle-timeout", mesh.DefaultIdleTimeout, "close a connection with no traffic either way for this long")
	fl.DurationVar(&f.drainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long open connections may finish")
	fl.DurationVar(&f.rotateInterval, "rotate-interval", admin.DefaultRotateInterval, "least time between two forced renewals by the admin API's POST /rotate (calls in between share the one in flight or get 429)")
	fl.IntVar(&f.maxConnections, "max-connections", 0, "refuse new connections past this many open ones (0: sized from RLIMIT_NOFILE, two descriptors a connection, keeping headroom for the admin, health and metrics ports)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fl.StringVar(&f.dnsServer, "dns-server", "", dnsServerUsage)
}

// defaultNamespace is the workload's namespace when neither --namespace nor
// the SVID names one.
const defaultNamespace = "default"

// proxiedConnFDs is the file descriptors a proxied connection holds: the
// client's and the upstream one.
const proxiedConnFDs = 2

// validate checks the timeouts and the connection limit.
func (f *serveFlags) validate() error {
	switch {
	case f.detectTimeout <= 0:
		return usagef("--detect-timeout must be positive")
	case f.idleTimeout <= 0:
		return usagef("--idle-timeout must be positive")
	case f.drainTimeout < 0:
		return usagef("--drain-timeout must not be negative")
	case f.rotateInterval <= 0:
		return usagef("--rotate-interval must be positive")
	case f.maxConnections < 0:
		return usagef("--max-connections must not be negative")
	}
	var err error
	if f.resolver, err = dnsResolver(f.dnsServer); err != nil {
		return err
	}
	f.nofile, f.nofileErr = fdlimit.Raise()
	if f.maxConnections == 0 {
		f.maxConnections = fdlimit.MaxConnections(f.nofile, proxiedConnFDs)
	}
	return nil
}

// start is the start-up sequence run and gateway share: it builds the
// identity source the flags name (trusting the foreign trust domains of
// feds), and hands it with build to serve.Run, which runs the identity
// source, builds and starts the data plane, serves the admin, metrics and
// health endpoints until ctx ends (SIGTERM), and drains.
func (f *serveFlags) start(ctx context.Context, idf *identityFlags, td spiffeid.TrustDomain, feds []tlsmgr.FederationEndpoint, log *slog.Logger,
	started string, build func(ctx context.Context, src tlsmgr.Source) (serve.Built, error)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	logConnectionLimit(log, f.maxConnections, f.nofile, f.nofileErr)
	src, err := idf.identitySource(ctx, td, log)
	if err != nil {
		return err
	}
	if src, err = federate(src, feds, log); err != nil {
		return err
	}
	cfg := serve.Config{
		Admin: f.admin, Metrics: f.metrics, Health: f.health,
		DrainTimeout: f.drainTimeout, RotateInterval: f.rotateInterval, Logger: log, Started: started,
		WrapHealth: f.appHealth.Wrap,
	}
	return serve.Run(ctx, cfg, src, func(ctx context.Context) (serve.Built, error) { return build(ctx, src) })
}

// logConnectionLimit says what bounds the connections and why.
func logConnectionLimit(log *slog.Logger, maxConns int, nofile uint64, err error) {
	if err != nil {
		log.Warn("could not raise the file descriptor limit", "err", err)
	}
	log.Info("connection limit", "max_connections", maxConns, "rlimit_nofile", nofile)
}

// workload is the workload policy selects by: namespace and the labels of
// labelsFile (none if empty).
func workload(namespace, labelsFile string) (policy.Workload, error) {
	wl := policy.Workload{Namespace: namespace, Labels: map[string]string{}}
	if labelsFile != "" {
		var err error
		if wl.Labels, err = policy.ReadLabelsFile(labelsFile); err != nil {
			return policy.Workload{}, fmt.Errorf("--labels-file: %w", err)
		}
	}
	return wl, nil
}

// policyOptions are extra followed by the options of --root-namespace,
// the logger and --trust-domain (if set).
func policyOptions(rootNamespace string, td spiffeid.TrustDomain, log *slog.Logger, extra ...policy.Option) []policy.Option {
	opts := append(extra, policy.WithRootNamespace(rootNamespace), policy.WithLogger(log))
	if !td.IsZero() {
		opts = append(opts, policy.WithTrustDomain(td))
	}
	return opts
}

// watchPolicy loads the policy of configDir and keeps it current until ctx
// ends.
func watchPolicy(ctx context.Context, configDir string, wl policy.Workload, opts []policy.Option, log *slog.Logger) (*policy.Store, error) {
	store, err := policy.NewStore(configDir, wl, opts...)
	if err != nil {
		return nil, fmt.Errorf("--config-dir: %w", err)
	}
	serve.Background(ctx, log, "policy watcher stopped", store.Run)
	return store, nil
}

func listenerNames(p *proxy.Proxy) []string {
	var out []string
	for _, a := range p.Addrs() {
		out = append(out, a.String())
	}
	return out
}

// parseFederateWith checks the syntax of every --federate-with value.
func parseFederateWith(specs []string) ([]tlsmgr.FederationEndpoint, error) {
	var out []tlsmgr.FederationEndpoint
	for _, spec := range specs {
		e, err := tlsmgr.ParseFederationEndpoint(strings.TrimSpace(spec))
		if err != nil {
			return nil, usagef("--federate-with %v", err)
		}
		out = append(out, e)
	}
	return out, nil
}

// federate adds the foreign trust domains of feds to src, if any.
func federate(src serve.Source, feds []tlsmgr.FederationEndpoint, log *slog.Logger) (serve.Source, error) {
	if len(feds) == 0 {
		return src, nil
	}
	for i := range feds {
		if err := feds[i].LoadBootstrap(); err != nil {
			return nil, fmt.Errorf("--federate-with: %w", err)
		}
	}
	fed, err := tlsmgr.NewFederated(src, feds, tlsmgr.WithFederationLogger(log))
	if err != nil {
		return nil, usagef("--federate-with: %v", err)
	}
	return fed, nil
}
