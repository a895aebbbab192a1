package gateway

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/metrics"
	"github.com/meshproxy/meshproxy/proxy/conntrack"
	"github.com/meshproxy/meshproxy/proxy/mesh"
	"github.com/meshproxy/meshproxy/tlsmgr"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Gateway is the ingress gateway data plane. Create it with New, bind with
// Start, keep its configuration and credentials current with Run, and stop
// it with Shutdown.
type Gateway struct {
	src       tlsmgr.Source
	pol       mesh.PolicySource
	configDir string
	creds     *credStore
	opts      options
	log       *slog.Logger
	cfg       atomic.Pointer[config]
	meshTLS   *mesh.ClientConfigs

	reloadMu  sync.Mutex // serialises config reloads; guards the fields below
	hash      [sha256.Size]byte
	failed    [sha256.Size]byte // content of the last failed load, reported once
	failedErr error

	conns *conntrack.Table

	mu        sync.Mutex
	base      context.Context
	started   bool
	closing   bool
	listeners map[uint16]*listener
	bindErrs  map[uint16]error
}

type listener struct {
	port  uint16
	label string
	ln    net.Listener
}

// New loads the Gateways and VirtualServices of configDir and the
// credentials they name from credentialsDir, serving src's identity toward
// the mesh under pol's DestinationRules and AuthorizationPolicies. A config
// error names the file, document and field; a credential that cannot be
// loaded is logged and its servers refuse connections until it can.
// Nothing is bound until Start.
func New(src tlsmgr.Source, pol mesh.PolicySource, configDir, credentialsDir string, opts ...Option) (*Gateway, error) {
	if src == nil || pol == nil {
		return nil, errors.New("gateway: an identity source and a policy source are required")
	}
	o := defaultOptions()
	for _, opt := range opts {
		opt(&o)
	}
	for _, d := range []struct{ what, dir string }{{"config dir", configDir}, {"credentials dir", credentialsDir}} {
		if d.dir == "" {
			return nil, fmt.Errorf("%s: empty path", d.what)
		}
		st, err := os.Stat(d.dir)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", d.what, err)
		}
		if !st.IsDir() {
			return nil, fmt.Errorf("%s %s: not a directory", d.what, d.dir)
		}
	}
	log := o.Log.With("component", "gateway")
	g := &Gateway{
		src:       src,
		pol:       pol,
		configDir: configDir,
		creds:     newCredStore(credentialsDir, log),
		opts:      o,
		log:       log,
		meshTLS:   mesh.NewClientConfigs(src),
		listeners: map[uint16]*listener{},
		bindErrs:  map[uint16]error{},
		conns:     conntrack.NewTable(log, o.MaxConns),
	}
	if err := g.reload(); err != nil {
		return nil, err
	}
	return g, nil
}

// reload reads the config directory and, if its content changed, validates
// it and swaps it in: new connections use the new listeners and routes,
// open ones keep theirs. A failure keeps the current config; it is counted
// and logged once per distinct bad content.
func (g *Gateway) reload() error {
	g.reloadMu.Lock()
	defer g.reloadMu.Unlock()
	files, err := manifest.ReadDir(g.configDir, "config")
	var sum [sha256.Size]byte
	if err != nil {
		sum = sha256.Sum256([]byte(err.Error()))
	} else {
		sum = manifest.Hash(files)
	}
	cur := g.cfg.Load()
	switch {
	case cur != nil && err == nil && sum == g.hash:
		return nil
	case sum == g.failed:
		return g.failedErr
	}
	var cfg *config
	if err == nil {
		var rejected error
		cfg, _, rejected = loadIsolated(files, workload{namespace: g.opts.namespace, labels: g.opts.labels}, g.log)
		counts := map[string]float64{"Gateway": 0, "VirtualService": 0}
		if rejected != nil {
			for _, msg := range strings.Split(rejected.Error(), "\n") {
				for kind := range counts {
					if strings.Contains(msg, "("+kind+" ") {
						counts[kind]++
					}
				}
				if !g.opts.strict {
					g.log.Error("gateway: document rejected; left out (its servers are not bound, its routes not used), the others apply", "dir", g.configDir, "reason", msg)
				}
			}
		}
		for kind, n := range counts {
			metrics.ConfigDocuments.WithLabelValues(kind, "rejected").Set(n)
		}
		if rejected != nil && g.opts.strict {
			err = rejected
		}
	}
	if err != nil {
		err = fmt.Errorf("gateway config %s: %w", g.configDir, err)
		g.failed, g.failedErr = sum, err
		metrics.ConfigReloads.WithLabelValues("gateway", "failure").Inc()
		if cur != nil {
			g.log.Error("gateway config reload failed; keeping the last good config", "dir", g.configDir, "generation", cur.gen, "err", err)
		}
		return err
	}
	cfg.gen = 1
	if cur != nil {
		cfg.gen = cur.gen + 1
	}
	g.creds.setWanted(cfg.credentials)
	g.cfg.Store(cfg)
	g.hash, g.failed, g.failedErr = sum, [sha256.Size]byte{}, nil
	metrics.ConfigReloads.WithLabelValues("gateway", "success").Inc()
	g.log.Info("gateway config loaded", "dir", g.configDir, "generation", cfg.gen, "ports", cfg.sortedPorts())
	if cur != nil {
		g.reconcile()
	}
	return nil
}

// Start binds a listener for every Gateway port and serves in the
// background until Shutdown. On failure nothing is left bound and the error
// names the port. ctx is used for binding and as the parent of connection
// contexts for its values only: cancelling it does not stop the gateway.
func (g *Gateway) Start(ctx context.Context) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.started || g.closing {
		return errors.New("gateway already started")
	}
	cfg := g.cfg.Load()
	var bound []*listener
	for _, port := range cfg.sortedPorts() {
		l, err := g.bind(ctx, port)
		if err != nil {
			for _, b := range bound {
				b.ln.Close()
			}
			return err
		}
		bound = append(bound, l)
	}
	g.base = context.WithoutCancel(ctx)
	g.started = true
	for _, l := range bound {
		g.serveLocked(l)
	}
	return nil
}

func (g *Gateway) bind(ctx context.Context, port uint16) (*listener, error) {
	addr := g.opts.listenAddr(port)
	ln, err := g.opts.ListenConfig.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("gateway listener for port %d on %s: %w", port, addr, err)
	}
	return &listener{port: port, label: strconv.Itoa(int(port)), ln: ln}, nil
}

// serveLocked registers l and starts its accept loop. g.mu is held.
func (g *Gateway) serveLocked(l *listener) {
	g.listeners[l.port] = l
	delete(g.bindErrs, l.port)
	g.conns.Serve(l.ln, func(c net.Conn) { g.admit(l, c) }, "port", l.port)
	g.log.Info("listening", "port", l.port, "addr", l.ln.Addr().String())
}

// reconcile binds the ports a new config added and closes those it
// removed; connections already accepted on a closed port carry on.
func (g *Gateway) reconcile() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.started || g.closing {
		return
	}
	cfg := g.cfg.Load()
	for port, l := range g.listeners {
		if _, ok := cfg.ports[port]; !ok {
			l.ln.Close()
			delete(g.listeners, port)
			g.log.Info("listener removed", "port", port)
		}
	}
	for port := range g.bindErrs {
		if _, ok := cfg.ports[port]; !ok {
			delete(g.bindErrs, port)
		}
	}
	for _, port := range cfg.sortedPorts() {
		if _, ok := g.listeners[port]; ok {
			continue
		}
		l, err := g.bind(g.base, port)
		if err != nil {
			g.bindErrs[port] = err
			g.log.Error("cannot add listener; retrying on the next config change", "port", port, "err", err)
			continue
		}
		g.serveLocked(l)
	}
}

// Run watches the config and credentials directories and applies changes
// until ctx is done.
func (g *Gateway) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() {
		watchDirs(ctx, []string{g.configDir}, g.opts.pollEvery, g.log, func() { _ = g.reload() })
	})
	wg.Go(func() {
		watchDirs(ctx, []string{g.creds.dir}, g.opts.pollEvery, g.log, g.creds.reload)
	})
	wg.Wait()
	return nil
}

// admit starts handling c, or closes it at once when over the limit or
// shutting down.
func (g *Gateway) admit(l *listener, c net.Conn) {
	err := g.conns.Admit(g.base, mesh.DirGateway, c, metrics.GatewayConnectionsActive.WithLabelValues(l.label), func(t *conntrack.Conn) {
		g.handle(l, &conn{Conn: t, listener: l.label}, c)
	})
	if errors.Is(err, conntrack.ErrOverLimit) {
		metrics.GatewayConnections.WithLabelValues(l.label, routeNone, ResultOverLimit).Inc()
		g.log.Warn("connection refused", "listener", l.label, "source", c.RemoteAddr().String(),
			"reason", ResultOverLimit, "max_connections", g.opts.MaxConns)
	}
	if err != nil {
		c.Close()
	}
}

// Shutdown stops accepting, lets open connections finish until ctx is done,
// then closes the rest and returns ctx's error. It returns once every
// connection goroutine has exited.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.closing = true
	g.conns.Close()
	for _, l := range g.listeners {
		l.ln.Close()
	}
	g.mu.Unlock()
	return g.conns.Drain(ctx)
}

// Ready returns nil when the identity is loaded and every Gateway port is
// bound, otherwise why not.
func (g *Gateway) Ready() error {
	g.mu.Lock()
	started, closing := g.started, g.closing
	var bindErrs []error
	for _, port := range slices.Sorted(maps.Keys(g.bindErrs)) {
		bindErrs = append(bindErrs, g.bindErrs[port])
	}
	g.mu.Unlock()
	switch {
	case closing:
		return errors.New("gateway is shutting down")
	case !started:
		return errors.New("listeners not bound yet")
	case len(bindErrs) > 0:
		return errors.Join(bindErrs...)
	}
	if err := g.src.Ready(); err != nil {
		return fmt.Errorf("identity: %w", err)
	}
	return nil
}

// Addr returns the bound address of the listener for a Gateway port, or nil.
func (g *Gateway) Addr(port uint16) net.Addr {
	g.mu.Lock()
	defer g.mu.Unlock()
	if l := g.listeners[port]; l != nil {
		return l.ln.Addr()
	}
	return nil
}

// Peers lists the connections being forwarded: the client, the destination,
// the destination's SPIFFE ID (mesh mTLS) and the bytes so far.
func (g *Gateway) Peers() []conntrack.PeerInfo { return g.conns.Peers() }

// Config returns the effective configuration in the admin API's shape:
// one listener per Gateway port, and under "policy" the gateway's servers,
// routes and credentials next to the mesh policy in force.
func (g *Gateway) Config() (mesh.Config, error) {
	cfg := g.cfg.Load()
	view := cfg.view()
	view.Credentials = g.creds.view()
	g.mu.Lock()
	for i := range view.Listeners {
		lv := &view.Listeners[i]
		if l := g.listeners[lv.Port]; l != nil {
			lv.Address = l.ln.Addr().String()
		} else if err := g.bindErrs[lv.Port]; err != nil {
			lv.Error = err.Error()
		}
	}
	g.mu.Unlock()
	pol, err := json.Marshal(struct {
		Gateway configView `json:"gateway"`
		Mesh    any        `json:"mesh"`
	}{view, g.pol.Current()})
	if err != nil {
		return mesh.Config{}, fmt.Errorf("marshal config: %w", err)
	}
	out := mesh.Config{Generation: cfg.gen, MeshCIDRs: []string{}, Listeners: []mesh.ListenerInfo{}, Policy: pol}
	if td, err := g.trustDomain(); err == nil {
		out.TrustDomain = td.String()
	}
	for _, lv := range view.Listeners {
		kind := "gateway-tls"
		if cfg.ports[lv.Port].tcp {
			kind = "gateway-tcp"
		}
		out.Listeners = append(out.Listeners, mesh.ListenerInfo{
			Name: fmt.Sprintf("%s %d", kind, lv.Port), Kind: kind, Listen: g.opts.listenAddr(lv.Port), Address: lv.Address,
		})
	}
	return out, nil
}

// trustDomain is the configured trust domain, else that of the current SVID.
func (g *Gateway) trustDomain() (spiffeid.TrustDomain, error) {
	return mesh.TrustDomain(g.opts.TrustDomain, g.src)
}
