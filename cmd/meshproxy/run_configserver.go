package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/policy/remote"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

const runConfigServerHelp = `

Config from the CA: --config-server HOST:PORT follows the Istio config mirror
of a CA started with 'ca serve --mirror-istio-config' (its --mirror-listen,
default port 15011). The sidecar authenticates with its own SVID, checks that
the server presents --config-server-id (default
spiffe://TD/ns/istio-system/sa/meshproxy-ca), and receives the
PeerAuthentication, AuthorizationPolicy and DestinationRule objects of its
namespace and the root namespace as the cluster has them; it writes them
atomically to --config-dir/` + remote.FileName + ` (the directory must be
writable, e.g. an emptyDir), where the policy watch loads them like any
other file, within a second or so of a 'kubectl apply'. At start-up the
sidecar waits for the first answer unless that file is already there from an
earlier run; while the server is unreachable the last documents stay in force.`

// configServerFlags are run's flags for following the CA's config mirror.
type configServerFlags struct {
	addr, id string
}

func (c *configServerFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&c.addr, "config-server", "", "HOST:PORT of a CA's Istio config mirror (ca serve --mirror-istio-config); its objects are written into --config-dir")
	fl.StringVar(&c.id, "config-server-id", "", "SPIFFE ID the config server must present (default spiffe://TD/ns/istio-system/sa/meshproxy-ca)")
}

func (c *configServerFlags) validate(configDir string) error {
	if c.addr == "" {
		if c.id != "" {
			return usagef("--config-server-id is set but --config-server is not")
		}
		return nil
	}
	if !isHostPort(c.addr) {
		return usagef("--config-server %q: want HOST:PORT, e.g. meshproxy-ca.istio-system.svc:15011", c.addr)
	}
	if configDir == "" {
		return usagef("--config-server needs --config-dir: the directory its documents are written to")
	}
	if c.id != "" {
		if _, err := spiffeid.FromString(c.id); err != nil {
			return usagef("--config-server-id %q: %v", c.id, err)
		}
	}
	return nil
}

// follow fills configDir from the config server before the policy is first
// loaded (unless an earlier run's file is there) and keeps it current until
// ctx ends.
func (c *configServerFlags) follow(ctx context.Context, src tlsmgr.Source, td spiffeid.TrustDomain, configDir string, log *slog.Logger) error {
	if c.addr == "" {
		return nil
	}
	var serverID spiffeid.ID
	var err error
	if c.id != "" {
		serverID, err = spiffeid.FromString(c.id)
	} else {
		if td.IsZero() {
			// The trust domain is the workload's own: known once the SVID is.
			if err := tlsmgr.WaitReady(ctx, src); err != nil {
				return fmt.Errorf("--config-server: waiting for the workload identity: %w", err)
			}
			td = src.Status().ID.TrustDomain()
		}
		serverID, err = spiffeid.FromPath(td, ca.ServingID)
	}
	if err != nil {
		return fmt.Errorf("--config-server-id: %w", err)
	}
	s, err := remote.New(c.addr, serverID, src, configDir, remote.WithLogger(log))
	if err != nil {
		return fmt.Errorf("--config-server: %w", err)
	}
	if s.HasFile() {
		log.Info("istio config: starting with the documents of an earlier run; following the config server", "file", s.Path(), "server", c.addr)
	} else {
		log.Info("istio config: waiting for the config server", "server", c.addr, "server_id", serverID.String())
		if err := s.WaitFirst(ctx); err != nil {
			return fmt.Errorf("--config-server %s: %w", c.addr, err)
		}
	}
	go func() {
		if err := s.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			log.Error("istio config: config server follower stopped", "err", err)
		}
	}()
	return nil
}
