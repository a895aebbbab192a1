package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/gateway"
	"github.com/meshproxy/meshproxy/internal/serve"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// gatewayFlags are the flags of `meshproxy gateway`.
type gatewayFlags struct {
	identityFlags
	serveFlags

	configDir, credentialsDir string
	strictConfig              bool
	listenHost                string
	namespace, labelsFile     string
	rootNamespace             string
	trustDomain               string
	configServer              configServerFlags
}

func newGatewayCmd() *cobra.Command {
	var f gatewayFlags
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run the ingress gateway: Istio Gateway listeners into the mesh with the gateway's SPIFFE identity",
		Long: `gateway accepts traffic from outside the mesh on the ports of the Istio Gateway
resources in --config-dir and routes it, at L4, by the VirtualServices there:

  protocol TCP              tcp routes by port; mesh mTLS to the destination
  tls.mode SIMPLE           TLS terminated with credentialName; tcp routes; mesh mTLS to the destination
  tls.mode MUTUAL           as SIMPLE, and a client certificate from NAME-ca.crt is required
  tls.mode PASSTHROUGH      tls routes by SNI; the client's TLS forwarded untouched

Toward the mesh the gateway presents its own SPIFFE identity, so STRICT services
accept it and their AuthorizationPolicies can name it. A DestinationRule's
subjectAltNames pin the destination's SPIFFE ID; otherwise any member of the
trust domain is accepted. AuthorizationPolicies selecting the gateway apply to
its ports. An SNI that no server covers is refused and counted.

Credentials: for credentialName NAME, --credentials-dir holds NAME.crt (chain,
leaf first), NAME.key and, for MUTUAL, NAME-ca.crt. The config and credential
files are watched: changes apply to new connections without a restart, and a
bad change keeps the last good state.

Identity, exactly one of (as for 'meshproxy run'):
  --ca-addr HOST:PORT --ca-root FILE --token-file FILE
  --workload-api unix:///PATH
  --cert-file F --key-file F --bundle-file F

SIGTERM stops accepting and lets open connections finish for up to --drain-timeout.`,
		Example: `  meshproxy gateway --cert-file gw.pem --key-file gw-key.pem --bundle-file bundle.pem \
      --config-dir ./gateway-config --credentials-dir ./credentials --listen-host 127.0.0.1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runGateway(cmd.Context(), &f, cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	f.identityFlags.register(fl)
	fl.StringVar(&f.configDir, "config-dir", "", "directory of Istio YAML: Gateway, VirtualService, DestinationRule, AuthorizationPolicy (watched; required)")
	f.configServer.register(fl)
	fl.StringVar(&f.credentialsDir, "credentials-dir", "", "directory of credentialName files NAME.crt, NAME.key, NAME-ca.crt (watched; required)")
	fl.BoolVar(&f.strictConfig, "strict-config", false, "refuse to start (and keep the last good config on reload) when any --config-dir document is rejected; by default a rejected document is reported and left out, failing closed, and the others apply")
	fl.StringVar(&f.listenHost, "listen-host", "", "address every Gateway port binds to (default: all addresses)")
	fl.StringVar(&f.namespace, "namespace", gateway.DefaultNamespace, "the gateway's namespace: default for manifests without one, and for exportTo and policy selection")
	fl.StringVar(&f.labelsFile, "labels-file", "", "the gateway's labels (downward-API format); when given, Gateway selectors must match them")
	fl.StringVar(&f.rootNamespace, "root-namespace", "istio-system", "namespace whose policies apply mesh-wide")
	fl.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of the mesh (default: that of the gateway's SVID)")
	f.serveFlags.register(fl, "how long a client on a TLS port may take to send its ClientHello")
	return cmd
}

// options validates the flags that shape the data plane.
func (f *gatewayFlags) options() ([]gateway.Option, error) {
	switch {
	case f.configDir == "":
		return nil, usagef("--config-dir is required: the directory of Gateway and VirtualService YAML")
	case f.credentialsDir == "":
		return nil, usagef("--credentials-dir is required: the directory of NAME.crt / NAME.key files")
	}
	if err := f.serveFlags.validate(); err != nil {
		return nil, err
	}
	if err := f.configServer.validate(f.configDir); err != nil {
		return nil, err
	}
	opts := []gateway.Option{
		gateway.WithDetectTimeout(f.detectTimeout),
		gateway.WithIdleTimeout(f.idleTimeout),
		gateway.WithMaxConnections(f.maxConnections),
		gateway.WithDialer(f.dialer()),
	}
	if f.listenHost != "" {
		if _, err := net.ResolveTCPAddr("tcp", net.JoinHostPort(f.listenHost, "0")); err != nil {
			return nil, usagef("--listen-host %q: %v", f.listenHost, err)
		}
		host := f.listenHost
		opts = append(opts, gateway.WithListenAddr(func(port uint16) string {
			return net.JoinHostPort(host, strconv.Itoa(int(port)))
		}))
	}
	return opts, nil
}

func runGateway(ctx context.Context, f *gatewayFlags, logTo io.Writer) error {
	log, err := newLogger(logTo, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	gopts, err := f.options()
	if err != nil {
		return err
	}
	if err := checkServerAddrs(f.admin, f.metrics, f.health); err != nil {
		return err
	}
	td, err := parseTrustDomain(f.trustDomain)
	if err != nil {
		return err
	}
	wl, err := workload(f.namespace, f.labelsFile)
	if err != nil {
		return err
	}
	var gwLabels map[string]string // nil: Gateway selectors are not checked
	if f.labelsFile != "" {
		gwLabels = wl.Labels
	}
	gopts = append(gopts, gateway.WithLogger(log), gateway.WithWorkload(f.namespace, gwLabels))
	if !td.IsZero() {
		gopts = append(gopts, gateway.WithTrustDomain(td))
	}

	return f.start(ctx, &f.identityFlags, td, nil, log, "gateway started", func(ctx context.Context, src tlsmgr.Source) (serve.Built, error) {
		if err := f.configServer.follow(ctx, src, td, f.configDir, log); err != nil {
			return serve.Built{}, err
		}
		store, err := watchPolicy(ctx, f.configDir, wl, policyOptions(f.rootNamespace, td, log, policy.WithStrictConfig(f.strictConfig), f.policyResolver()), log)
		if err != nil {
			return serve.Built{}, err
		}
		gw, err := gateway.New(src, store, f.configDir, f.credentialsDir, append(gopts, gateway.WithStrictConfig(f.strictConfig))...)
		if err != nil {
			return serve.Built{}, fmt.Errorf("--config-dir / --credentials-dir: %w", err)
		}
		if err := gw.Start(ctx); err != nil {
			return serve.Built{}, err
		}
		return serve.Built{Plane: gw, Loop: gw.Run, Attrs: []any{"config_dir", f.configDir, "credentials_dir", f.credentialsDir}}, nil
	})
}
