package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/internal/serve"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// svidNamespace is NS of an ID of Istio's form spiffe://TD/ns/NS/sa/SA, or
// "" for any other form.
func svidNamespace(id spiffeid.ID) string {
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) == 4 && seg[0] == "ns" && seg[1] != "" && seg[2] == "sa" && seg[3] != "" {
		return seg[1]
	}
	return ""
}

// workloadScoped are the kinds that apply only to workloads of their own
// namespace, or to every workload from the root namespace.
var workloadScoped = map[string]bool{"PeerAuthentication": true, "AuthorizationPolicy": true}

// warnForeignPolicies logs every PeerAuthentication and AuthorizationPolicy
// in dir that can never apply to a workload of namespace ns: one of another
// namespace that is not rootNS. Files that do not load are left to the
// policy store to report.
func warnForeignPolicies(log *slog.Logger, dir, ns, rootNS string) {
	files, err := manifest.ReadDir(dir, "policy")
	if err != nil {
		return
	}
	docs, _ := manifest.Documents(files)
	for _, d := range docs {
		var obj struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if json.Unmarshal(d.JSON, &obj) != nil || !workloadScoped[obj.Kind] {
			continue
		}
		if n := obj.Metadata.Namespace; n != "" && n != ns && n != rootNS {
			log.Warn("policy can never apply to this workload: it is in another namespace, not the root namespace",
				"where", d.Named(obj.Kind, n+"/"+obj.Metadata.Name), "policy_namespace", n, "workload_namespace", ns, "root_namespace", rootNS)
		}
	}
}

// svidPolicy is the policy of --config-dir for a workload whose namespace
// comes from its SVID: until the identity is loaded and that namespace's
// policy with it, it fails closed with STRICT and no rule, and the sidecar
// is not ready (Ready); then it is the store of the workload's namespace.
type svidPolicy struct {
	closed *policy.Store
	cur    atomic.Pointer[policy.Store]
	failed atomic.Pointer[error] // why the store could not be made, if it could not
}

// Ready reports whether the policy of the workload's namespace is in
// effect; the proxy is not ready until it is (an app connection in between
// would meet the fail-closed policy, not the configured one).
func (p *svidPolicy) Ready() error {
	if p.cur.Load() != nil {
		return nil
	}
	if err := p.failed.Load(); err != nil {
		return *err
	}
	return errors.New("the policy of --config-dir for the SVID's namespace is not loaded yet")
}

// Current implements mesh.PolicySource.
func (p *svidPolicy) Current() *policy.Snapshot {
	if s := p.cur.Load(); s != nil {
		return s.Current()
	}
	return p.closed.Current()
}

// watchPolicyForSVID checks configDir now (a bad directory fails start-up as
// with --namespace), then, once src holds an identity, loads and watches it
// for the SVID's namespace (wl's when the ID is not of Istio's form).
func watchPolicyForSVID(ctx context.Context, src tlsmgr.Source, configDir string, wl policy.Workload, rootNS string, opts []policy.Option, log *slog.Logger) (*svidPolicy, error) {
	if _, err := policy.NewStore(configDir, wl, append(opts[:len(opts):len(opts)], policy.WithLogger(slog.New(slog.DiscardHandler)), policy.WithResolver(noResolve))...); err != nil {
		return nil, fmt.Errorf("--config-dir: %w", err)
	}
	p := &svidPolicy{closed: policy.Static(wl, append(opts[:len(opts):len(opts)], policy.WithDefaultMode(policy.ModeStrict))...)}
	serve.Background(ctx, log, "policy watcher stopped", func(ctx context.Context) error {
		if err := tlsmgr.WaitReady(ctx, src); err != nil {
			return err
		}
		id := src.Status().ID
		if ns := svidNamespace(id); ns != "" {
			wl.Namespace = ns
			log.Info("workload namespace from the SVID", "namespace", ns, "spiffe_id", id.String())
		} else {
			log.Warn("the SVID is not of the form spiffe://TD/ns/NS/sa/SA; policy selects namespace "+wl.Namespace+" (set --namespace)", "spiffe_id", id.String())
		}
		warnForeignPolicies(log, configDir, wl.Namespace, rootNS)
		store, err := watchPolicy(ctx, configDir, wl, opts, log)
		if err != nil {
			p.failed.Store(&err)
			return err
		}
		p.cur.Store(store)
		return nil
	})
	return p, nil
}
