package policy

import (
	"maps"
	"net/netip"
	"sort"
)

// buildSnapshot resolves a directory's documents for one workload.
func buildSnapshot(gen uint64, cfg *Config, wl Workload, o *options, resolved map[string][]netip.Addr) *Snapshot {
	set := &cfg.set
	var docs []Document
	for _, d := range cfg.Documents {
		if d.Result != ResultApplied {
			docs = append(docs, d)
		}
	}
	return &Snapshot{
		docs:        docs,
		log:         o.log,
		gen:         gen,
		wl:          Workload{Namespace: wl.Namespace, Labels: maps.Clone(wl.Labels)},
		rootNS:      o.rootNS,
		defaultMode: o.defaultMode,
		peer:        resolvePeerAuth(set.peerAuths, wl, o.rootNS, o.defaultMode),
		authz:       selectAuthz(set.authz, wl, o.rootNS),
		dests:       buildDestRules(set.dests, wl, o.rootNS, resolved),
		resolved:    resolved,
	}
}

type snapshotView struct {
	Generation         uint64              `json:"generation"`
	Namespace          string              `json:"namespace"`
	Labels             map[string]string   `json:"labels"`
	RootNamespace      string              `json:"root_namespace"`
	DefaultMode        string              `json:"default_mode"`
	PeerAuthentication peerAuthView        `json:"peer_authentication"`
	Authorization      []authzView         `json:"authorization_policies"`
	DestinationRules   []destView          `json:"destination_rules"`
	ResolvedHosts      map[string][]string `json:"resolved_hosts,omitempty"`
	// Documents are the documents not applied as written: warned,
	// dry-run and rejected, with their messages.
	Documents []documentView `json:"documents"`
}

type documentView struct {
	Where string `json:"where"`
	Document
}

func (s *Snapshot) view() snapshotView {
	v := snapshotView{
		Generation:         s.gen,
		Namespace:          s.wl.Namespace,
		Labels:             s.wl.Labels,
		RootNamespace:      s.rootNS,
		DefaultMode:        s.defaultMode.String(),
		PeerAuthentication: s.peer.view(),
		Authorization:      s.authz.view(),
		DestinationRules:   s.dests.view(),
	}
	v.Documents = []documentView{}
	for _, d := range s.docs {
		v.Documents = append(v.Documents, documentView{Where: d.Where(), Document: d})
	}
	if v.Labels == nil {
		v.Labels = map[string]string{}
	}
	if len(s.resolved) > 0 {
		v.ResolvedHosts = make(map[string][]string, len(s.resolved))
		for name, addrs := range s.resolved {
			out := make([]string, 0, len(addrs))
			for _, a := range addrs {
				out = append(out, a.String())
			}
			sort.Strings(out)
			v.ResolvedHosts[name] = out
		}
	}
	return v
}
