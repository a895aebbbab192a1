package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/spf13/pflag"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/authn"
	"github.com/meshproxy/meshproxy/ca/mirror"
)

const caMirrorHelp = `
Istio config mirror: with --mirror-istio-config the CA lists and watches the
Istio custom resources — security.istio.io/v1 PeerAuthentication and
AuthorizationPolicy, networking.istio.io/v1 DestinationRule, Gateway and
VirtualService — at the API server (in-cluster config, or --kubeconfig) and
serves them on --mirror-listen (HTTPS, the CA's serving certificate) to
sidecars started with --config-server: each caller authenticates with its
SVID and receives the objects of its own namespace and of --root-namespace,
within a second or so of a change (long polling; no ConfigMap refresh
delay). The CA's service account needs list and watch on exactly those
five resources (ClusterRole meshproxy-ca-istio-config in
deploy/kubernetes/base/ca-rbac.yaml); a refusal is logged with the missing
permission, counted in meshproxy_ca_config_mirror_sync_errors_total, and
sidecars are answered 503 (they keep their current policy) until every
resource has been listed.
`

// caMirrorFlags are the flags of the Istio config mirror on "ca serve".
type caMirrorFlags struct {
	enabled       bool
	listen        string
	rootNamespace string
}

func (m *caMirrorFlags) register(f *pflag.FlagSet) {
	f.BoolVar(&m.enabled, "mirror-istio-config", false, "list and watch Istio's PeerAuthentication, AuthorizationPolicy, DestinationRule, Gateway and VirtualService and serve them to sidecars (run --config-server) on --mirror-listen")
	f.StringVar(&m.listen, "mirror-listen", ":15011", "with --mirror-istio-config: address of the config endpoint (HTTPS, callers authenticate with their SVID)")
	f.StringVar(&m.rootNamespace, "root-namespace", "istio-system", "with --mirror-istio-config: namespace whose objects every workload receives")
}

func (m *caMirrorFlags) validate() error {
	if !m.enabled {
		return nil
	}
	if !isHostPort(m.listen) {
		return usagef("--mirror-listen %q: want HOST:PORT, e.g. :15011", m.listen)
	}
	if m.rootNamespace == "" {
		return usagef("--root-namespace must not be empty")
	}
	return nil
}

// start runs the mirror and its endpoint beside srv until ctx ends; stop
// waits for them.
func (m *caMirrorFlags) start(ctx context.Context, srv *ca.Server, kubeconfig string, log *slog.Logger) (stop func(), err error) {
	if !m.enabled {
		return func() {}, nil
	}
	api, err := kubeAPI(kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("--mirror-istio-config: %w", err)
	}
	lis, err := net.Listen("tcp", m.listen)
	if err != nil {
		return nil, fmt.Errorf("--mirror-listen: %w", err)
	}
	mir := mirror.New(api, mirror.WithLogger(log))
	h := mirror.NewHandler(mir, srv.TrustBundle(), mirror.WithRootNamespace(m.rootNamespace), mirror.WithHandlerLogger(log))
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { _ = mir.Run(ctx) })
	wg.Go(func() {
		if err := srv.ServeConfig(ctx, lis, h); err != nil {
			log.Error("istio config endpoint failed", "err", err)
		}
	})
	log.Info("istio config mirror started", "api_server", api.Server(), "resources", len(mirror.Resources), "root_namespace", m.rootNamespace)
	return func() { cancel(); wg.Wait() }, nil
}

// kubeAPI is the API server of kubeconfig, or of the cluster this process
// runs in when kubeconfig is empty.
func kubeAPI(kubeconfig string) (*authn.KubeAPI, error) {
	if kubeconfig != "" {
		return authn.KubeconfigAPI(kubeconfig)
	}
	return authn.InClusterAPI()
}
