package apphealth

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strings"

	"golang.org/x/net/http/httpguts"
	"k8s.io/apimachinery/pkg/util/validation"
)

// PathPrefix is where the rewritten probes point on the health port.
const PathPrefix = "/app-health/"

// The probe kinds, the last element of a probe path.
const (
	Liveness  = "livez"
	Readiness = "readyz"
	Startup   = "startupz"
)

// Schemes of an HTTP probe.
const (
	SchemeHTTP  = "HTTP"
	SchemeHTTPS = "HTTPS"
)

// DefaultTimeoutSeconds is the kubelet's default probe timeout.
const DefaultTimeoutSeconds = 1

// maxTimeoutSeconds bounds one probe: a probe that may hang for hours is a
// mistake, not a wish.
const maxTimeoutSeconds = 3600

// ownHealthPort is the sidecar's health port: a probe to it would probe itself.
const ownHealthPort = 15021

// Path returns the health-port path of a container's probe of a kind
// (Liveness, Readiness or Startup).
func Path(container, kind string) string {
	return PathPrefix + container + "/" + kind
}

// Probers are the original probes, by the path (see Path) the rewritten
// probe calls. It is the JSON of --app-probers.
type Probers map[string]Prober

// Prober is one original probe: exactly one of HTTPGet, TCPSocket and GRPC,
// with the kubelet's field names. Ports are numbers (inject resolves named
// ports); there is no host: the target is always this pod.
type Prober struct {
	HTTPGet        *HTTPGet   `json:"httpGet,omitempty"`
	TCPSocket      *TCPSocket `json:"tcpSocket,omitempty"`
	GRPC           *GRPC      `json:"grpc,omitempty"`
	TimeoutSeconds int32      `json:"timeoutSeconds,omitempty"`
}

// HTTPGet is an HTTP probe.
type HTTPGet struct {
	Path        string       `json:"path,omitempty"`
	Port        int32        `json:"port"`
	Scheme      string       `json:"scheme,omitempty"` // HTTP (default) or HTTPS
	HTTPHeaders []HTTPHeader `json:"httpHeaders,omitempty"`
}

// HTTPHeader is a header an HTTP probe sends; "Host" sets the Host header.
type HTTPHeader struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// TCPSocket is a TCP connect probe.
type TCPSocket struct {
	Port int32 `json:"port"`
}

// GRPC is a gRPC health-checking protocol probe (grpc.health.v1.Health/Check).
type GRPC struct {
	Port    int32   `json:"port"`
	Service *string `json:"service,omitempty"`
}

// Parse decodes and validates the JSON of --app-probers; empty input (or
// only white space) is no probes. Unknown fields are errors, and every
// error names the probe path at fault.
func Parse(data []byte) (Probers, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return Probers{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var p Probers
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("app probers JSON: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("app probers JSON: trailing data after the object")
	}
	if p == nil {
		return nil, errors.New("app probers JSON: want an object of probe paths, have null")
	}
	paths := make([]string, 0, len(p))
	for path := range p {
		paths = append(paths, path)
	}
	sort.Strings(paths)
	for _, path := range paths {
		pr := p[path]
		if err := checkPath(path); err != nil {
			return nil, fmt.Errorf("probe %q: %w", path, err)
		}
		if err := pr.normalize(); err != nil {
			return nil, fmt.Errorf("probe %q: %w", path, err)
		}
		p[path] = pr
	}
	return p, nil
}

// JSON encodes p as --app-probers takes it (keys sorted, so stable).
func (p Probers) JSON() (string, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return "", fmt.Errorf("encode app probers: %w", err)
	}
	return string(b), nil
}

// Check reports what Parse would refuse in pr.
func (pr Prober) Check() error {
	if pr.HTTPGet != nil {
		g := *pr.HTTPGet // normalize fills in defaults; leave the caller's as it is
		pr.HTTPGet = &g
	}
	return pr.normalize()
}

func checkPath(path string) error {
	rest, ok := strings.CutPrefix(path, PathPrefix)
	container, kind, ok2 := strings.Cut(rest, "/")
	if !ok || !ok2 {
		return fmt.Errorf("want %sCONTAINER/livez|readyz|startupz", PathPrefix)
	}
	if len(validation.IsDNS1123Label(container)) > 0 { // a Kubernetes container name
		return fmt.Errorf("container %q is not a container name (lower-case letters, digits and '-', at most 63)", container)
	}
	switch kind {
	case Liveness, Readiness, Startup:
		return nil
	}
	return fmt.Errorf("probe kind %q: want livez, readyz or startupz", kind)
}

// normalize checks pr and fills in the kubelet's defaults.
func (pr *Prober) normalize() error {
	n := 0
	for _, set := range []bool{pr.HTTPGet != nil, pr.TCPSocket != nil, pr.GRPC != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return fmt.Errorf("want exactly one of httpGet, tcpSocket and grpc, have %d", n)
	}
	switch {
	case pr.TimeoutSeconds < 0 || pr.TimeoutSeconds > maxTimeoutSeconds:
		return fmt.Errorf("timeoutSeconds %d: want 1-%d", pr.TimeoutSeconds, maxTimeoutSeconds)
	case pr.TimeoutSeconds == 0:
		pr.TimeoutSeconds = DefaultTimeoutSeconds
	}
	switch {
	case pr.HTTPGet != nil:
		return pr.HTTPGet.normalize()
	case pr.TCPSocket != nil:
		return checkPort("tcpSocket", pr.TCPSocket.Port)
	default:
		return checkPort("grpc", pr.GRPC.Port)
	}
}

func (h *HTTPGet) normalize() error {
	if err := checkPort("httpGet", h.Port); err != nil {
		return err
	}
	switch strings.ToUpper(h.Scheme) {
	case "", SchemeHTTP:
		h.Scheme = SchemeHTTP
	case SchemeHTTPS:
		h.Scheme = SchemeHTTPS
	default:
		return fmt.Errorf("httpGet.scheme %q: want HTTP or HTTPS", h.Scheme)
	}
	if h.Path == "" {
		h.Path = "/"
	}
	// A path, optionally with a query: never a scheme or host of its own,
	// so the request cannot leave the pod.
	u, err := url.Parse(h.Path)
	if err != nil || u.Scheme != "" || u.Host != "" || u.User != nil || !strings.HasPrefix(h.Path, "/") {
		return fmt.Errorf("httpGet.path %q: want an absolute path such as /healthz", h.Path)
	}
	for _, hd := range h.HTTPHeaders {
		if !httpguts.ValidHeaderFieldName(hd.Name) {
			return fmt.Errorf("httpGet.httpHeaders: %q is not a header name", hd.Name)
		}
		if !httpguts.ValidHeaderFieldValue(hd.Value) {
			return fmt.Errorf("httpGet.httpHeaders: the value of %s is not a valid header value", hd.Name)
		}
	}
	return nil
}

func checkPort(field string, port int32) error {
	switch {
	case port < 1 || port > 65535:
		return fmt.Errorf("%s.port %d: want 1-65535", field, port)
	case port == ownHealthPort:
		return fmt.Errorf("%s.port %d is the sidecar's health port: the probe would call itself", field, port)
	}
	return nil
}
