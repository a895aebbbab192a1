package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Peer names a proxy implementation under comparison.
type Peer string

// The peers, in the order reports list them.
const (
	Meshproxy Peer = "meshproxy"
	HAProxy   Peer = "haproxy"
	Stunnel   Peer = "stunnel"
	// MeshproxyB is a second meshproxy binary (Binaries.MeshproxyB), for
	// measuring a change against the baseline in the same interleaved run.
	MeshproxyB Peer = "meshproxy-b"
	// MeshproxyDirect is the meshproxy pair with --hbone=never: one mesh
	// mTLS connection per app connection, what meshproxy does with a peer
	// that does not speak HBONE (an Envoy/Istio sidecar).
	MeshproxyDirect Peer = "meshproxy-direct"
	// MeshproxyHBONE is the meshproxy pair with --hbone=always: app
	// connections travel as HTTP/2 CONNECT streams to the server's HBONE
	// listener in Istio's format (ALPN h2), over pooled mTLS connections.
	MeshproxyHBONE Peer = "meshproxy-hbone"
	// MeshproxyX25519 is MeshproxyDirect with --tls-key-exchange x25519:
	// classical key exchange instead of X25519MLKEM768.
	MeshproxyX25519 Peer = "meshproxy-x25519"
	// MeshproxyOneCPU is Meshproxy with --concurrency 1: one thread runs
	// the sidecar's Go code (GOMAXPROCS 1) at any load, where the default
	// takes a second while the load needs it.
	MeshproxyOneCPU Peer = "meshproxy-1cpu"
	// MeshproxyBaseline is a meshproxy binary built from an earlier commit
	// (Binaries.Baseline) run with its own defaults: "today's" meshproxy
	// of an issue's targets, measured in the same run.
	MeshproxyBaseline Peer = "meshproxy-baseline"
	// HAProxyFull is HAProxy with TLS session resumption off in its client,
	// so every new connection is a full handshake (issue 17's baseline for
	// new connections). It differs from HAProxy only in ScenarioConns, the
	// only scenario it runs.
	HAProxyFull Peer = "haproxy-full"
	// Ghostunnel is ghostunnel (bench/ghostunnel pins the version), the Go
	// mTLS proxy of the field: server and client mode, peers authorized by
	// SPIFFE ID (--allow-uri, --verify-uri).
	Ghostunnel Peer = "ghostunnel"
	// GoTLS is bench/cmd/tlspipe: a plain io.Copy each way over crypto/tls
	// with go-spiffe's mTLS configuration, the floor a straightforward Go
	// proxy sets (opt-in).
	GoTLS Peer = "go-tls"
	// AEADFloor is bench/cmd/tlspipe with -records exporter: after the
	// TLS 1.3 handshake it seals its own records (keys from the TLS
	// exporter) with no user-space copy and a few large system calls — the
	// least work per byte of any encrypting userspace proxy pair, so its
	// bulk figures are the machine's ceiling for all of them (opt-in; a
	// measuring instrument, not a protocol to deploy).
	AEADFloor Peer = "aead-floor"
)

// AllPeers lists the peers of the comparison (the other meshproxy
// variants are opt-in). Meshproxy runs with its defaults, so its two
// sidecars negotiate HBONE.
var AllPeers = []Peer{Meshproxy, MeshproxyDirect, HAProxy, HAProxyFull, Stunnel, Ghostunnel}

var knownPeers = []Peer{Meshproxy, HAProxy, HAProxyFull, Stunnel, Ghostunnel, GoTLS, AEADFloor, MeshproxyB, MeshproxyBaseline, MeshproxyDirect, MeshproxyHBONE, MeshproxyX25519, MeshproxyOneCPU}

// Title is the peer's display name.
func (p Peer) Title() string {
	switch p {
	case HAProxy:
		return "HAProxy"
	case HAProxyFull:
		return "HAProxy-full"
	default:
		return string(p)
	}
}

// Runs reports whether p takes part in scenario sc: HAProxyFull only in
// ScenarioConns (elsewhere it is HAProxy); Ghostunnel everywhere but
// ScenarioUpload, which needs a half-close passed on: when one direction
// ends, ghostunnel closes both (its proxy.copyData), so the app's count
// never reaches the client. Every other peer runs everything.
func (p Peer) Runs(sc Scenario) bool {
	switch p {
	case HAProxyFull:
		return sc == ScenarioConns
	case Ghostunnel:
		return sc != ScenarioUpload
	}
	return true
}

func (p Peer) isMeshproxy() bool {
	return p == Meshproxy || p == MeshproxyB || p == MeshproxyBaseline || p == MeshproxyHBONE || p == MeshproxyDirect || p == MeshproxyX25519 || p == MeshproxyOneCPU
}

// ParsePeer validates a peer name.
func ParsePeer(s string) (Peer, error) {
	for _, p := range knownPeers {
		if string(p) == strings.ToLower(strings.TrimSpace(s)) {
			return p, nil
		}
	}
	return "", fmt.Errorf("unknown peer %q (want one of %s)", s, strings.Join(PeerNames(knownPeers), ", "))
}

// PeerNames spells peers as ParsePeer reads them.
func PeerNames(peers []Peer) []string {
	names := make([]string, len(peers))
	for i, p := range peers {
		names[i] = string(p)
	}
	return names
}

// readyTimeout bounds how long a pair may take to carry its first request.
const readyTimeout = 30 * time.Second

// CipherSuite is the TLS 1.3 suite HAProxy and stunnel are pinned to: the
// one Go negotiates between two meshproxy sidecars on AES-NI hardware, so
// every pair encrypts the same way.
const CipherSuite = "TLS_AES_128_GCM_SHA256"

// Binaries are the programs a run starts; an empty peer path means that
// peer is unavailable.
type Binaries struct {
	Meshproxy  string
	MeshproxyB string // optional second meshproxy build (peer MeshproxyB)
	Baseline   string // optional meshproxy of an earlier commit (peer MeshproxyBaseline)
	HAProxy    string
	Stunnel    string
	Ghostunnel string // built from bench/ghostunnel (BuildGhostunnel)
	TLSPipe    string // bench/cmd/tlspipe (peers GoTLS and AEADFloor)
}

// Path returns the binary of peer p, or "" if it is unavailable.
func (b Binaries) Path(p Peer) string {
	switch p {
	case Meshproxy, MeshproxyDirect, MeshproxyHBONE, MeshproxyX25519, MeshproxyOneCPU:
		return b.Meshproxy
	case MeshproxyB:
		return b.MeshproxyB
	case MeshproxyBaseline:
		return b.Baseline
	case HAProxy, HAProxyFull:
		return b.HAProxy
	case Stunnel:
		return b.Stunnel
	case Ghostunnel:
		return b.Ghostunnel
	case GoTLS, AEADFloor:
		return b.TLSPipe
	}
	return ""
}

// Env is one run's PKI, binaries and echo app; it starts proxy pairs and
// stops whatever is still running on Close.
type Env struct {
	Dir     string
	PKI     *PKI
	Bins    Binaries
	AppAddr string // the echo app's address
	// NoPeerResume turns TLS session resumption off in the HAProxy and
	// stunnel clients (both resume by default; meshproxy's outbound does
	// not), for a like-for-like full-handshake comparison.
	NoPeerResume bool

	echo *Proc // the echo app StartEcho started (nil when it runs in-process)

	mu    sync.Mutex
	procs map[*Proc]struct{}
	seq   int
}

// NewEnv generates a PKI in dir for pairs forwarding to the echo app at
// appAddr.
func NewEnv(dir string, bins Binaries, appAddr string) (*Env, error) {
	pki, err := NewPKI(dir)
	if err != nil {
		return nil, fmt.Errorf("generate pki: %w", err)
	}
	return &Env{Dir: dir, PKI: pki, Bins: bins, AppAddr: appAddr, procs: map[*Proc]struct{}{}}, nil
}

// Start starts a process the env stops on Close.
func (e *Env) Start(name string, argv ...string) (*Proc, error) {
	e.mu.Lock()
	e.seq++
	log := filepath.Join(e.Dir, fmt.Sprintf("%03d-%s.log", e.seq, name))
	e.mu.Unlock()
	p, err := StartProc(name, log, argv...)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.procs[p] = struct{}{}
	e.mu.Unlock()
	return p, nil
}

func (e *Env) stop(p *Proc) {
	p.Stop()
	e.mu.Lock()
	delete(e.procs, p)
	e.mu.Unlock()
}

// Close stops every process still running.
func (e *Env) Close() {
	e.mu.Lock()
	procs := make([]*Proc, 0, len(e.procs))
	for p := range e.procs {
		procs = append(procs, p)
	}
	e.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.stop(p)
		}()
	}
	wg.Wait()
}

// Pair is a running client proxy + server proxy.
type Pair struct {
	Peer   Peer
	Addr   string // the client proxy's plaintext listener
	Client *Proc
	Server *Proc
	// Admin is the meshproxy server sidecar's admin API address (with
	// PairOptions.Admin), for /debug/pprof/.
	Admin string
	env   *Env
}

// Procs returns the pair's two processes, client first.
func (p *Pair) Procs() []*Proc { return []*Proc{p.Client, p.Server} }

// Stop stops both processes.
func (p *Pair) Stop() {
	p.env.stop(p.Client)
	p.env.stop(p.Server)
}

// PairOptions tune StartPair.
type PairOptions struct {
	// Admin enables the meshproxy server sidecar's admin API on a free
	// loopback port (for profiling).
	Admin bool
}

// StartPair starts the client and server proxies of peer and waits until a
// request travels through them to the echo app. A start that fails because
// a port picked free was taken meanwhile is retried.
func (e *Env) StartPair(ctx context.Context, peer Peer, opt PairOptions) (*Pair, error) {
	if e.Bins.Path(peer) == "" {
		return nil, fmt.Errorf("%s: binary not available", peer)
	}
	var err error
	for range 3 {
		var p *Pair
		if p, err = e.startPair(ctx, peer, opt); err == nil {
			return p, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}

func (e *Env) startPair(ctx context.Context, peer Peer, opt PairOptions) (*Pair, error) {
	ports, err := freePorts(4)
	if err != nil {
		return nil, err
	}
	clientAddr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	serverAddr := fmt.Sprintf("127.0.0.1:%d", ports[1])
	p := &Pair{Peer: peer, Addr: clientAddr, env: e}
	if opt.Admin && peer.isMeshproxy() {
		p.Admin = fmt.Sprintf("127.0.0.1:%d", ports[2])
	}
	serverArgv, clientArgv, err := e.argv(peer, clientAddr, serverAddr, p.Admin)
	if err == nil {
		switch peer {
		case MeshproxyHBONE:
			hbone := fmt.Sprintf("127.0.0.1:%d", ports[3])
			serverArgv = append(serverArgv, "--hbone=always", "--hbone-listen", hbone)
			clientArgv = append(clientArgv, "--hbone=always", "--hbone-listen", "off", "--hbone-peer", serverAddr+"="+hbone)
		case MeshproxyDirect:
			serverArgv = append(serverArgv, "--hbone=never")
			clientArgv = append(clientArgv, "--hbone=never")
		case MeshproxyX25519:
			serverArgv = append(serverArgv, "--hbone=never", "--tls-key-exchange", "x25519")
			clientArgv = append(clientArgv, "--hbone=never", "--tls-key-exchange", "x25519")
		case MeshproxyOneCPU:
			serverArgv = append(serverArgv, "--concurrency", "1")
			clientArgv = append(clientArgv, "--concurrency", "1")
		}
	}
	if err != nil {
		return nil, err
	}
	if p.Server, err = e.Start(string(peer)+"-server", serverArgv...); err != nil {
		return nil, err
	}
	if p.Client, err = e.Start(string(peer)+"-client", clientArgv...); err != nil {
		e.stop(p.Server)
		return nil, err
	}
	if err := p.waitReady(ctx); err != nil {
		p.Stop()
		return nil, err
	}
	return p, nil
}

// waitReady polls until one echo goes through the pair.
func (p *Pair) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	req := append([]byte{ModeEcho}, "meshproxy-bench!"...)
	buf := make([]byte, len(req))
	var last error
	for {
		for _, pr := range p.Procs() {
			if err := pr.ExitError(); err != nil {
				return fmt.Errorf("%s pair: %w; log:\n%s", p.Peer, err, pr.LogTail(20))
			}
		}
		c, err := dial(ctx, p.Addr)
		if err == nil {
			err = exchange(c, req, req[1:], buf)
			c.Close()
			if err == nil {
				return nil
			}
		}
		last = err
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s pair not ready after %s: %w; client log:\n%s\nserver log:\n%s",
				p.Peer, readyTimeout, last, p.Client.LogTail(10), p.Server.LogTail(10))
		case <-t.C:
		}
	}
}

// argv builds the command lines of peer's server and client proxies.
func (e *Env) argv(peer Peer, clientAddr, serverAddr, admin string) (server, client []string, err error) {
	k := e.PKI
	switch peer {
	case Meshproxy, MeshproxyB, MeshproxyBaseline, MeshproxyDirect, MeshproxyHBONE, MeshproxyX25519, MeshproxyOneCPU:
		bin := e.Bins.Path(peer)
		if admin == "" {
			admin = "off"
		}
		server = []string{bin, "run",
			"--cert-file", k.Server.Chain, "--key-file", k.Server.Key, "--bundle-file", k.Root,
			"--inbound-explicit", serverAddr + "=" + e.AppAddr, "--mode", "STRICT",
			"--admin", admin, "--metrics", "off", "--health", "off", "--drain-timeout", "2s"}
		client = []string{bin, "run",
			"--cert-file", k.Client.Chain, "--key-file", k.Client.Key, "--bundle-file", k.Root,
			"--outbound-explicit", clientAddr + "=" + serverAddr + "#" + ServerID,
			"--admin", "off", "--metrics", "off", "--health", "off", "--drain-timeout", "2s"}
		return server, client, nil
	case HAProxy, HAProxyFull:
		sc, err := e.writeConfig("haproxy-server-*.cfg", haproxyServerConfig(serverAddr, e.AppAddr, k))
		if err != nil {
			return nil, nil, err
		}
		resume := !e.NoPeerResume && peer == HAProxy
		cc, err := e.writeConfig("haproxy-client-*.cfg", haproxyClientConfig(clientAddr, serverAddr, k, resume))
		if err != nil {
			return nil, nil, err
		}
		// -db: stay in the foreground, one process (no master-worker).
		return []string{e.Bins.HAProxy, "-db", "-f", sc}, []string{e.Bins.HAProxy, "-db", "-f", cc}, nil
	case Stunnel:
		sc, err := e.writeConfig("stunnel-server-*.conf", stunnelServerConfig(serverAddr, e.AppAddr, k))
		if err != nil {
			return nil, nil, err
		}
		cc, err := e.writeConfig("stunnel-client-*.conf", stunnelClientConfig(clientAddr, serverAddr, k, !e.NoPeerResume))
		if err != nil {
			return nil, nil, err
		}
		return []string{e.Bins.Stunnel, sc}, []string{e.Bins.Stunnel, cc}, nil
	case Ghostunnel:
		// Logging off (--quiet=all): the other peers log nothing per
		// connection either.
		bin := e.Bins.Ghostunnel
		server = []string{bin, "server", "--listen", serverAddr, "--target", e.AppAddr,
			"--cert", k.Server.Chain, "--key", k.Server.Key, "--cacert", k.Root, "--allow-uri", ClientID, "--quiet=all"}
		client = []string{bin, "client", "--listen", clientAddr, "--target", serverAddr,
			"--cert", k.Client.Chain, "--key", k.Client.Key, "--cacert", k.Root, "--verify-uri", ServerID, "--quiet=all"}
		return server, client, nil
	case GoTLS, AEADFloor:
		bin, records := e.Bins.TLSPipe, "tls"
		if peer == AEADFloor {
			records = "exporter"
		}
		server = []string{bin, "-mode", "server", "-listen", serverAddr, "-target", e.AppAddr,
			"-cert", k.Server.Chain, "-key", k.Server.Key, "-bundle", k.Root, "-peer-id", ClientID, "-records", records}
		client = []string{bin, "-mode", "client", "-listen", clientAddr, "-target", serverAddr,
			"-cert", k.Client.Chain, "-key", k.Client.Key, "-bundle", k.Root, "-peer-id", ServerID, "-records", records}
		return server, client, nil
	}
	return nil, nil, fmt.Errorf("unknown peer %q", peer)
}

func (e *Env) writeConfig(pattern, body string) (string, error) {
	f, err := os.CreateTemp(e.Dir, pattern)
	if err != nil {
		return "", fmt.Errorf("write config: %w", err)
	}
	_, werr := f.WriteString(body)
	if err := errors.Join(werr, f.Close()); err != nil {
		return "", fmt.Errorf("write config %s: %w", f.Name(), err)
	}
	return f.Name(), nil
}

// haproxyGlobal is shared by both HAProxy configs: TLS 1.3 only, the
// pinned suite, room for the idle-connection scenario, long timeouts so
// held connections stay open.
func haproxyGlobal() string {
	return `global
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-bind-ciphersuites ` + CipherSuite + `
    ssl-default-server-options ssl-min-ver TLSv1.3
    ssl-default-server-ciphersuites ` + CipherSuite + `

defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
`
}

func haproxyServerConfig(listen, app string, k *PKI) string {
	return haproxyGlobal() + `
frontend mesh_in
    bind ` + listen + ` ssl crt ` + k.Server.Combined + ` ca-file ` + k.Root + ` verify required alpn istio
    default_backend app

backend app
    server app ` + app + `
`
}

func haproxyClientConfig(listen, server string, k *PKI, resume bool) string {
	opt := ""
	if !resume {
		opt = " no-ssl-reuse"
	}
	return haproxyGlobal() + `
frontend app_out
    bind ` + listen + `
    default_backend mesh

backend mesh
    server peer ` + server + ` ssl crt ` + k.Client.Combined + ` ca-file ` + k.Root + ` verify required alpn istio` + opt + `
`
}

// stunnelGlobal: foreground, no pid file, warnings only, TLS 1.3 only with
// the pinned suite.
func stunnelGlobal() string {
	return `foreground = yes
pid =
debug = warning
sslVersionMin = TLSv1.3
ciphersuites = ` + CipherSuite + `
`
}

func stunnelServerConfig(listen, app string, k *PKI) string {
	return stunnelGlobal() + `
[mesh_in]
accept = ` + listen + `
connect = ` + app + `
cert = ` + k.Server.Chain + `
key = ` + k.Server.Key + `
CAfile = ` + k.Root + `
verifyChain = yes
requireCert = yes
`
}

func stunnelClientConfig(listen, server string, k *PKI, resume bool) string {
	opt := ""
	if !resume {
		opt = "sessionResume = no\n"
	}
	return stunnelGlobal() + `
[mesh_out]
client = yes
accept = ` + listen + `
connect = ` + server + `
cert = ` + k.Client.Chain + `
key = ` + k.Client.Key + `
CAfile = ` + k.Root + `
verifyChain = yes
` + opt
}

// freePorts returns n distinct loopback ports that were free a moment ago.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick a free port: %w", err)
		}
		lns = append(lns, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
