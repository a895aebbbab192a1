package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/internal/ports"
	"github.com/meshproxy/meshproxy/internal/serve"
)

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Run the certificate authority (istiod's CA role)",
		Long: `The meshproxy CA keeps a root and a signing (intermediate) certificate in Istio's
plugged-in CA layout (root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem) and
signs workload CSRs into short-lived X.509-SVIDs over Istio's CA gRPC API
(istio.v1.auth.IstioCertificateService/CreateCertificate).`,
		Args: cobra.NoArgs,
	}
	cmd.AddCommand(newCAInitCmd(), newCAServeCmd(), newCARotateRootCmd(), newCAStatusCmd())
	return cmd
}

func newCAInitCmd() *cobra.Command {
	var (
		dir, trustDomain, keyType string
		rootTTL, caTTL            time.Duration
		force                     bool
	)
	cmd := &cobra.Command{
		Use:   "init --dir DIR --trust-domain TD",
		Short: "Create a new root and signing certificate in Istio's plugged-in CA layout",
		Long: `init creates a self-signed root certificate and a signing (intermediate)
certificate under it, both carrying the trust domain's SPIFFE ID (spiffe://TD) as
URI SAN, and writes them to DIR:

  root-cert.pem    the trust bundle (the root)
  ca-cert.pem      the signing certificate
  ca-key.pem       the signing key (PKCS#8, mode 0600)
  cert-chain.pem   ca-cert.pem followed by the root

The layout is the one of Istio's "cacerts" secret, so the directory can be used
by istiod and by meshproxy alike. The root key is not written anywhere: to make a
new signing certificate later, run init again (a new root) or use your own PKI.
init refuses to overwrite an existing CA unless --force is given.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usagef("--dir is required")
			}
			if trustDomain == "" {
				return usagef("--trust-domain is required")
			}
			td, err := spiffeid.TrustDomainFromString(trustDomain)
			if err != nil {
				return usagef("--trust-domain %q: %v", trustDomain, err)
			}
			kt, err := ca.ParseKeyType(keyType)
			if err != nil {
				return usagef("--key-type: %v", err)
			}
			if rootTTL <= 0 {
				return usagef("--root-ttl must be positive, got %s", rootTTL)
			}
			if caTTL <= 0 {
				return usagef("--ca-ttl must be positive, got %s", caTTL)
			}
			if caTTL > rootTTL {
				return usagef("--ca-ttl %s exceeds --root-ttl %s: the signing certificate cannot outlive its root", caTTL, rootTTL)
			}
			if err := ca.Init(dir, td, ca.WithRootTTL(rootTTL), ca.WithCATTL(caTTL), ca.WithKeyType(kt), ca.WithForce(force)); err != nil {
				if errors.Is(err, ca.ErrExists) {
					return fmt.Errorf("%w; pass --force to replace it", err)
				}
				return err
			}
			a, err := ca.Load(dir)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA for trust domain %s written to %s (root valid until %s, signing certificate until %s)\n",
				a.TrustDomain().Name(), dir, a.RootsNotAfter().UTC().Format(time.RFC3339), a.NotAfter().UTC().Format(time.RFC3339))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "directory to write the CA files to (created 0700 if missing)")
	f.StringVar(&trustDomain, "trust-domain", "", "SPIFFE trust domain of the CA, e.g. cluster.local")
	f.DurationVar(&rootTTL, "root-ttl", ca.DefaultRootTTL, "lifetime of the self-signed root certificate")
	f.DurationVar(&caTTL, "ca-ttl", ca.DefaultCATTL, "lifetime of the signing (intermediate) certificate; at most --root-ttl")
	f.StringVar(&keyType, "key-type", string(ca.KeyECDSAP256), "key algorithm of root and signing certificate: "+joinKeyTypes())
	f.BoolVar(&force, "force", false, "replace an existing CA in --dir (its root and key are lost)")
	return cmd
}

func joinKeyTypes() string {
	s := make([]string, len(ca.KeyTypes))
	for i, k := range ca.KeyTypes {
		s[i] = string(k)
	}
	return strings.Join(s, ", ")
}

// Authentication methods of --auth.
var authMethods = []string{"token", "kubernetes", "jwks"}

// caServeFlags are the flags of `meshproxy ca serve`.
type caServeFlags struct {
	dir, listen, metrics, trustDomain   string
	tokens, kubeconfig, jwks, jwtIssuer string
	auth, servingDNS                    []string
	defaultTTL, maxTTL                  time.Duration
	logLevel, logFormat                 string
	signer                              signerFlags
	rotation                            caRotationFlags
	mirror                              caMirrorFlags

	td spiffeid.TrustDomain // parsed --trust-domain, set by validate
}

func (f *caServeFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.dir, "dir", "", "CA directory in Istio's plugged-in layout (root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem)")
	fl.StringVar(&f.listen, "listen", ports.Any(ports.CA), "address of the CA gRPC API (TLS)")
	fl.StringSliceVar(&f.auth, "auth", []string{"kubernetes"}, "caller authentication methods, tried in order: token, kubernetes, jwks")
	fl.StringVar(&f.tokens, "tokens", "", "token file for --auth token: one \"TOKEN SPIFFE-ID\" a line")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the API server for --auth kubernetes and --mirror-istio-config (default: in-cluster config); also used to fetch a --jwks URL")
	fl.StringVar(&f.jwks, "jwks", "", "JWKS for --auth jwks: a file, or an https URL such as https://API-SERVER/openid/v1/jwks")
	fl.StringVar(&f.jwtIssuer, "jwt-issuer", "", "required iss claim for --auth jwks, e.g. https://kubernetes.default.svc.cluster.local")
	fl.DurationVar(&f.defaultTTL, "default-ttl", ca.DefaultTTL, "validity of certificates whose request asks for none")
	fl.DurationVar(&f.maxTTL, "max-ttl", ca.MaxTTL, "longest validity a caller may request (longer is InvalidArgument)")
	fl.StringVar(&f.metrics, "metrics", ports.Any(ports.CAMetrics), "address of the Prometheus endpoint (/metrics, /stats/prometheus); 'off' (or empty) disables it")
	fl.StringSliceVar(&f.servingDNS, "serving-dns", nil, "extra DNS names (or IPs) for the CA's TLS serving certificate")
	fl.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of a CA whose certificates carry no spiffe:// URI SAN (must match it otherwise)")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	f.signer.register(fl)
	f.rotation.register(fl)
	f.mirror.register(fl)
}

// validate checks the flags that need no file or network.
func (f *caServeFlags) validate() error {
	if err := f.signer.validate(f.dir); err != nil {
		return err
	}
	if f.listen == "" {
		return usagef("--listen is required")
	}
	if f.metrics == serve.Off {
		f.metrics = ""
	}
	if f.defaultTTL <= 0 {
		return usagef("--default-ttl must be positive, got %s", f.defaultTTL)
	}
	if f.maxTTL <= 0 {
		return usagef("--max-ttl must be positive, got %s", f.maxTTL)
	}
	if f.defaultTTL > f.maxTTL {
		return usagef("--default-ttl %s exceeds --max-ttl %s", f.defaultTTL, f.maxTTL)
	}
	if f.trustDomain != "" {
		var err error
		if f.td, err = spiffeid.TrustDomainFromString(f.trustDomain); err != nil {
			return usagef("--trust-domain %q: %v", f.trustDomain, err)
		}
	}
	if len(f.auth) == 0 {
		return usagef("--auth needs at least one of %s", strings.Join(authMethods, ", "))
	}
	for _, m := range f.auth {
		if !slices.Contains(authMethods, m) {
			return usagef("--auth: unknown method %q (want %s)", m, strings.Join(authMethods, ", "))
		}
	}
	uses := func(m string) bool { return slices.Contains(f.auth, m) }
	switch {
	case uses("token") && f.tokens == "":
		return usagef("--auth token needs --tokens FILE")
	case !uses("token") && f.tokens != "":
		return usagef("--tokens is set but --auth does not include token")
	case uses("jwks") && f.jwks == "":
		return usagef("--auth jwks needs --jwks FILE|URL")
	case uses("jwks") && f.jwtIssuer == "":
		return usagef("--auth jwks needs --jwt-issuer")
	case !uses("jwks") && (f.jwks != "" || f.jwtIssuer != ""):
		return usagef("--jwks/--jwt-issuer are set but --auth does not include jwks")
	case !uses("kubernetes") && !uses("jwks") && !f.mirror.enabled && f.kubeconfig != "":
		return usagef("--kubeconfig is set but neither --auth kubernetes|jwks nor --mirror-istio-config uses it")
	}
	return f.mirror.validate()
}

func newCAServeCmd() *cobra.Command {
	var f caServeFlags
	cmd := &cobra.Command{
		Use:   "serve --dir DIR | --signer stepca|vault ...",
		Short: "Serve Istio's CA gRPC API, signing CSRs for authenticated workloads",
		Long: `serve loads the CA from DIR (Istio's plugged-in layout, as written by "ca init",
Istio's tooling, openssl or cert-manager) and serves
istio.v1.auth.IstioCertificateService/CreateCertificate over TLS on --listen.

The certificate's identity always comes from the caller's authentication, never
from the CSR. Callers send "authorization: Bearer <token>" metadata, checked by
the --auth methods in order:

  token        static tokens from --tokens: lines "TOKEN SPIFFE-ID"; '#' comments.
               The file is re-read when it changes (for VMs, demos, tests).
  kubernetes   a projected service account token (audience istio-ca), checked with
               a TokenReview at the API server: in-cluster config, or --kubeconfig.
               system:serviceaccount:NS:SA becomes spiffe://TD/ns/NS/sa/SA.
  jwks         the same token verified offline against --jwks (file or https URL)
               and --jwt-issuer, for a CA running outside the cluster.

A caller presenting a valid SVID of this CA as TLS client certificate may always
renew its own identity without a token.

Errors are gRPC codes: Unauthenticated (no or bad credentials), PermissionDenied
(identity not allowed, e.g. outside the trust domain), InvalidArgument (bad CSR,
unsupported key, validity over --max-ttl), Unavailable (the API server or JWKS
endpoint could not be reached).

The TLS serving certificate is issued by the CA itself for the DNS names
istiod.istio-system.svc, meshproxy-ca.istio-system.svc, localhost, the
--serving-dns names, and 127.0.0.1 and ::1; it is renewed at half its life.
SIGTERM or SIGINT stops the server gracefully.
` + signerHelp + caServeRotationHelp + caMirrorHelp,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runCA(cmd.Context(), &f, cmd.ErrOrStderr())
		},
	}
	f.register(cmd.Flags())
	return cmd
}

// runCA builds the authority, its authenticators and the gRPC server
// from the flags and serves until ctx ends.
func runCA(ctx context.Context, f *caServeFlags, logTo io.Writer) error {
	if err := f.validate(); err != nil {
		return err
	}
	log, err := newLogger(logTo, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	opts := []ca.Option{ca.WithDefaultTTL(f.defaultTTL), ca.WithMaxTTL(f.maxTTL)}
	if !f.td.IsZero() {
		opts = append(opts, ca.WithTrustDomain(f.td))
	}
	rotOpts, err := f.rotation.serverOptions(f.signer.signer, f.dir, opts)
	if err != nil {
		return err
	}
	authority, closeSigner, err := f.signer.authority(ctx, f.dir, log, opts...)
	if err != nil {
		return err
	}
	defer closeSigner()
	authenticators, err := buildAuthenticators(f.auth, authority.TrustDomain(), log, f.tokens, f.kubeconfig, f.jwks, f.jwtIssuer)
	if err != nil {
		return err
	}
	srv, err := ca.NewServer(authority, authenticators, append([]ca.ServerOption{ca.WithLogger(log), ca.WithServingDNS(f.servingDNS...)}, rotOpts...)...)
	if err != nil {
		return usagef("--serving-dns: %v", err)
	}
	stopMirror, err := f.mirror.start(ctx, srv, f.kubeconfig, log)
	if err != nil {
		return err
	}
	defer stopMirror()
	return serveCA(ctx, srv, f.listen, f.metrics, log)
}

func buildAuthenticators(methods []string, td spiffeid.TrustDomain, log *slog.Logger, tokens, kubeconfig, jwks, issuer string) ([]authn.Authenticator, error) {
	var api *authn.KubeAPI
	kubeAPI := func() (*authn.KubeAPI, error) {
		if api != nil {
			return api, nil
		}
		var err error
		if kubeconfig != "" {
			api, err = authn.KubeconfigAPI(kubeconfig)
		} else {
			api, err = authn.InClusterAPI()
		}
		return api, err
	}
	var out []authn.Authenticator
	for _, m := range methods {
		switch m {
		case "token":
			t, err := authn.NewTokens(tokens, authn.WithLogger(log))
			if err != nil {
				return nil, err
			}
			out = append(out, t)
		case "kubernetes":
			a, err := kubeAPI()
			if err != nil {
				return nil, err
			}
			out = append(out, authn.NewKubernetes(a, td, authn.WithLogger(log)))
		case "jwks":
			opts := []authn.Option{authn.WithLogger(log)}
			if kubeconfig != "" {
				a, err := kubeAPI()
				if err != nil {
					return nil, err
				}
				opts = append(opts, authn.WithHTTPClient(a))
			}
			j, err := authn.NewJWKS(jwks, issuer, td, opts...)
			if err != nil {
				return nil, err
			}
			out = append(out, j)
		}
	}
	return out, nil
}

// serveCA runs the CA API and, if metricsAddr is set, the metrics endpoint
// until ctx ends or one of them fails.
func serveCA(ctx context.Context, srv *ca.Server, listen, metricsAddr string, log *slog.Logger) error {
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	metricsDone := make(chan error, 1)
	if metricsAddr != "" {
		mlis, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			_ = lis.Close()
			return fmt.Errorf("--metrics: %w", err)
		}
		log.Info("metrics serving", "addr", mlis.Addr().String())
		go func() {
			err := ca.ServeMetrics(ctx, mlis)
			if err != nil {
				log.Error("metrics endpoint failed", "err", err)
				cancel()
			}
			metricsDone <- err
		}()
	} else {
		metricsDone <- nil
	}
	err = srv.Serve(ctx, lis)
	cancel()
	return errors.Join(err, <-metricsDone)
}
