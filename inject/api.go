package inject

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/meshproxy/meshproxy/internal/ports"
)

// ErrNotBuilt is returned by Manifest in binaries built with the noinject
// tag (the container image), which leave out the Kubernetes API types.
var ErrNotBuilt = errors.New("inject is not part of this build (the container image leaves it out to stay small); run meshproxy inject from a local build or a release binary")

// Names of what injection adds; the contract with the manifests under
// deploy/ and with `meshproxy run` / `meshproxy redirect`.
const (
	InitContainerName = "meshproxy-init"
	SidecarName       = "meshproxy"

	StatusAnnotation      = "sidecar.meshproxy.io/status"
	InjectAnnotation      = "sidecar.meshproxy.io/inject"
	IstioInjectAnnotation = "sidecar.istio.io/inject"
	istioStatusAnnotation = "sidecar.istio.io/status"
	defaultContainerKey   = "kubectl.kubernetes.io/default-container"
	// InjectedLabel marks injected pods; the PodMonitor selects on it.
	InjectedLabel = "sidecar.meshproxy.io/injected"

	// OriginalProbesAnnotation keeps the application's probes that
	// injection rewrote to the sidecar's health port, as JSON (container →
	// probe field → probe), so injecting again restores them first.
	OriginalProbesAnnotation = "sidecar.meshproxy.io/original-probes"
	// RewriteProbesAnnotation "false" (or Istio's
	// sidecar.istio.io/rewriteAppHTTPProbers "false") leaves the
	// application's probes as they are.
	RewriteProbesAnnotation      = "sidecar.meshproxy.io/rewriteAppProbers"
	istioRewriteProbesAnnotation = "sidecar.istio.io/rewriteAppHTTPProbers"
	// AppProbersEnv hands the original probes to the sidecar (the
	// environment form of `meshproxy run --app-probers`).
	AppProbersEnv = "MESHPROXY_APP_PROBERS"

	// CARootConfigMap holds the mesh trust bundle (key root-cert.pem) in
	// every namespace with injected pods. It is required: a pod without it
	// does not start, rather than start without trust.
	CARootConfigMap = "meshproxy-ca-root"
	// PolicyConfigMap holds the namespace's Istio policy YAML; optional.
	PolicyConfigMap = "meshproxy-policy"
	// TokenAudience is the audience of the projected token the CA checks.
	TokenAudience          = "istio-ca"
	tokenExpirationSeconds = 43200

	// hostCgroupMount is where the ebpf init container sees the host cgroup2 tree.
	hostCgroupMount = "/host/sys/fs/cgroup"

	// MetricsPort and HealthPort are the sidecar's Prometheus and readiness ports.
	MetricsPort = ports.Metrics
	HealthPort  = ports.Health
	// MetricsPortName and HealthPortName name them in the pod spec
	// (at most 15 characters, unique in the pod).
	MetricsPortName = "http-mp-stats"
	HealthPortName  = "http-mp-health"
)

// Injector adds meshproxy to the workloads of Kubernetes manifests. It is
// safe for concurrent use.
type Injector struct{ cfg config }

// New returns an Injector. Defaults: image DefaultImage(version), CA
// DefaultCAAddr, mode nftables, proxy uid 1337, native sidecar, no mesh
// CIDRs and no exclusions.
func New(opts ...Option) (*Injector, error) {
	c := config{caAddr: DefaultCAAddr(), mode: DefaultMode, proxyUID: DefaultProxyUID, version: "dev", native: true}
	for _, o := range opts {
		if err := o(&c); err != nil {
			return nil, err
		}
	}
	if !c.imageSet {
		c.image = DefaultImage(c.version)
	}
	switch {
	case c.mode == ModeEBPF && c.ebpfCgroup == "":
		c.ebpfCgroup = DefaultEBPFCgroup
	case c.mode != ModeEBPF && c.ebpfCgroup != "":
		return nil, fmt.Errorf("ebpf cgroup %q given for mode %s (only ebpf uses it)", c.ebpfCgroup, c.mode)
	}
	return &Injector{cfg: c}, nil
}

// Result says what happened to one workload.
type Result struct {
	Document int    // 1-based index among the non-empty documents
	Path     string // "items[2]" for an item of a kind: List, else ""
	Object   string // e.g. "Deployment demo/echo"
	Injected bool
	Reason   string // why it was left alone, when not Injected
}

func (r Result) String() string {
	where := "document " + strconv.Itoa(r.Document)
	if r.Path != "" {
		where += " " + r.Path
	}
	if r.Injected {
		return where + ": " + r.Object + ": injected"
	}
	return where + ": " + r.Object + ": skipped: " + r.Reason
}

// DocumentError is a problem with one document of a manifest.
type DocumentError struct {
	Document int    // 1-based index among the non-empty documents
	Line     int    // input line where the document starts
	Object   string // e.g. "Deployment demo/echo", when known
	Field    string // path of the offending field, when it is about one
	Err      error
}

func (e *DocumentError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "document %d (line %d", e.Document, e.Line)
	if e.Object != "" {
		b.WriteString(", " + e.Object)
	}
	b.WriteString(")")
	if e.Field != "" {
		b.WriteString(": field " + e.Field)
	}
	b.WriteString(": " + e.Err.Error())
	return b.String()
}

func (e *DocumentError) Unwrap() error { return e.Err }
