package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// repoRoot is the module root (tests run in deploy/).
const repoRoot = ".."

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// doc is one document of a YAML file, as JSON.
type doc struct {
	file       string
	index      int // 1-based
	apiVersion string
	kind       string
	name       string
	json       []byte
}

func (d doc) String() string {
	return fmt.Sprintf("%s document %d (%s %s)", d.file, d.index, d.kind, d.name)
}

// parseDocs splits a multi-document YAML stream and converts each
// non-empty document to JSON, refusing duplicate keys.
func parseDocs(name string, data []byte) ([]doc, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs []doc
	for {
		chunk, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: split documents: %w", name, err)
		}
		j, err := yaml.YAMLToJSONStrict(chunk)
		if err != nil {
			return nil, fmt.Errorf("%s document %d: %w", name, len(docs)+1, err)
		}
		if string(bytes.TrimSpace(j)) == "null" {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := kjson.UnmarshalCaseSensitivePreserveInts(j, &head); err != nil {
			return nil, fmt.Errorf("%s document %d: %w", name, len(docs)+1, err)
		}
		docs = append(docs, doc{file: name, index: len(docs) + 1, apiVersion: head.APIVersion,
			kind: head.Kind, name: head.Metadata.Name, json: j})
	}
}

func readDocs(t *testing.T, name string, data []byte) []doc {
	t.Helper()
	docs, err := parseDocs(name, data)
	if err != nil {
		t.Fatal(err)
	}
	return docs
}

func readFileDocs(t *testing.T, path string) []doc {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return readDocs(t, path, data)
}

// strictUnmarshal decodes JSON as the API server does with
// fieldValidation=Strict.
func strictUnmarshal(j []byte, v any) error {
	strict, err := kjson.UnmarshalStrict(j, v)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// kubeTypes are the Kubernetes kinds our manifests may contain.
var kubeTypes = map[string]func() any{
	"v1/Namespace":                  func() any { return &corev1.Namespace{} },
	"v1/ServiceAccount":             func() any { return &corev1.ServiceAccount{} },
	"v1/Service":                    func() any { return &corev1.Service{} },
	"v1/ConfigMap":                  func() any { return &corev1.ConfigMap{} },
	"v1/Secret":                     func() any { return &corev1.Secret{} },
	"v1/Pod":                        func() any { return &corev1.Pod{} },
	"apps/v1/Deployment":            func() any { return &appsv1.Deployment{} },
	"apps/v1/StatefulSet":           func() any { return &appsv1.StatefulSet{} },
	"apps/v1/DaemonSet":             func() any { return &appsv1.DaemonSet{} },
	"batch/v1/Job":                  func() any { return &batchv1.Job{} },
	"batch/v1/CronJob":              func() any { return &batchv1.CronJob{} },
	"policy/v1/PodDisruptionBudget": func() any { return &policyv1.PodDisruptionBudget{} },
	"rbac.authorization.k8s.io/v1/ClusterRole":        func() any { return &rbacv1.ClusterRole{} },
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": func() any { return &rbacv1.ClusterRoleBinding{} },
	"rbac.authorization.k8s.io/v1/Role":               func() any { return &rbacv1.Role{} },
	"rbac.authorization.k8s.io/v1/RoleBinding":        func() any { return &rbacv1.RoleBinding{} },
}

// Minimal strict forms of the Istio resources we ship (the subset docs/CONTRACT.md
// supports); the policy test also loads them with the sidecar's policy package.
type istioMeta struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels,omitempty"`
}

type workloadSelector struct {
	MatchLabels map[string]string `json:"matchLabels"`
}

type mtlsMode struct {
	Mode string `json:"mode"`
}

type peerAuthentication struct {
	APIVersion string    `json:"apiVersion"`
	Kind       string    `json:"kind"`
	Metadata   istioMeta `json:"metadata"`
	Spec       struct {
		Selector      *workloadSelector   `json:"selector,omitempty"`
		MTLS          *mtlsMode           `json:"mtls,omitempty"`
		PortLevelMTLS map[string]mtlsMode `json:"portLevelMtls,omitempty"`
	} `json:"spec"`
}

type authorizationPolicy struct {
	APIVersion string    `json:"apiVersion"`
	Kind       string    `json:"kind"`
	Metadata   istioMeta `json:"metadata"`
	Spec       struct {
		Selector *workloadSelector `json:"selector,omitempty"`
		Action   string            `json:"action,omitempty"`
		Rules    []struct {
			From []struct {
				Source struct {
					Principals    []string `json:"principals,omitempty"`
					NotPrincipals []string `json:"notPrincipals,omitempty"`
					Namespaces    []string `json:"namespaces,omitempty"`
					NotNamespaces []string `json:"notNamespaces,omitempty"`
				} `json:"source"`
			} `json:"from,omitempty"`
			To []struct {
				Operation struct {
					Ports    []string `json:"ports,omitempty"`
					NotPorts []string `json:"notPorts,omitempty"`
				} `json:"operation"`
			} `json:"to,omitempty"`
		} `json:"rules,omitempty"`
	} `json:"spec"`
}

// monitorObject is a minimal strict form of the Prometheus operator's
// PodMonitor and ServiceMonitor, covering the fields we use.
type monitorObject struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		NamespaceSelector struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector"`
		Selector            metav1.LabelSelector `json:"selector"`
		PodMetricsEndpoints []monitorEndpoint    `json:"podMetricsEndpoints,omitempty"`
		Endpoints           []monitorEndpoint    `json:"endpoints,omitempty"`
	} `json:"spec"`
}

type monitorEndpoint struct {
	Port     string `json:"port"`
	Path     string `json:"path"`
	Interval string `json:"interval,omitempty"`
}

// decodeStrict decodes one document into its typed form and returns it.
func decodeStrict(d doc) (any, error) {
	if newT, ok := kubeTypes[d.apiVersion+"/"+d.kind]; ok {
		v := newT()
		return v, strictUnmarshal(d.json, v)
	}
	switch {
	case strings.HasPrefix(d.apiVersion, "security.istio.io/") || strings.HasPrefix(d.apiVersion, "networking.istio.io/"):
		if d.apiVersion != "security.istio.io/v1" {
			return nil, fmt.Errorf("apiVersion %s: use security.istio.io/v1", d.apiVersion)
		}
		switch d.kind {
		case "PeerAuthentication":
			var v peerAuthentication
			return &v, strictUnmarshal(d.json, &v)
		case "AuthorizationPolicy":
			var v authorizationPolicy
			return &v, strictUnmarshal(d.json, &v)
		}
		return nil, fmt.Errorf("no schema for Istio kind %s", d.kind)
	case d.apiVersion == "monitoring.coreos.com/v1" && (d.kind == "PodMonitor" || d.kind == "ServiceMonitor"):
		var m monitorObject
		return &m, strictUnmarshal(d.json, &m)
	}
	return nil, fmt.Errorf("no schema for %s %s: add it to the test's kubeTypes", d.apiVersion, d.kind)
}

// podSpecProblems checks a pod spec against the API server's validation
// rules that injection or our manifests could break.
func podSpecProblems(spec *corev1.PodSpec) []string {
	var probs []string
	bad := func(format string, args ...any) { probs = append(probs, fmt.Sprintf(format, args...)) }
	vols := map[string]bool{}
	for _, v := range spec.Volumes {
		if errs := validation.IsDNS1123Label(v.Name); len(errs) > 0 {
			bad("volume %q: %s", v.Name, strings.Join(errs, "; "))
		}
		if vols[v.Name] {
			bad("volume %q defined twice", v.Name)
		}
		vols[v.Name] = true
		if p := v.Projected; p != nil {
			for _, s := range p.Sources {
				if t := s.ServiceAccountToken; t != nil && t.ExpirationSeconds != nil && *t.ExpirationSeconds < 600 {
					bad("volume %q: token expirationSeconds %d < 600", v.Name, *t.ExpirationSeconds)
				}
			}
		}
	}
	names := map[string]bool{}
	ports := map[string]bool{}
	check := func(c corev1.Container, init bool) {
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 {
			bad("container %q: %s", c.Name, strings.Join(errs, "; "))
		}
		if names[c.Name] {
			bad("container name %q used twice", c.Name)
		}
		names[c.Name] = true
		if c.Image == "" {
			bad("container %q: no image", c.Name)
		}
		restartable := c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
		if c.RestartPolicy != nil && (!init || !restartable) {
			bad("container %q: restartPolicy is only allowed as Always on init containers", c.Name)
		}
		if init && !restartable && (c.ReadinessProbe != nil || c.LivenessProbe != nil || c.StartupProbe != nil) {
			bad("init container %q: probes are only allowed on restartable (sidecar) init containers", c.Name)
		}
		for _, p := range c.Ports {
			if p.Name == "" {
				continue
			}
			if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
				bad("container %q port %q: %s", c.Name, p.Name, strings.Join(errs, "; "))
			}
			if ports[p.Name] {
				bad("port name %q used twice in the pod", p.Name)
			}
			ports[p.Name] = true
		}
		for _, m := range c.VolumeMounts {
			if !vols[m.Name] {
				bad("container %q mounts undefined volume %q", c.Name, m.Name)
			}
		}
		for _, e := range c.Env {
			if errs := validation.IsEnvVarName(e.Name); len(errs) > 0 {
				bad("container %q env %q: %s", c.Name, e.Name, strings.Join(errs, "; "))
			}
			if e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil {
				r := e.ValueFrom.ResourceFieldRef
				if r.ContainerName != "" && !slices.ContainsFunc(slices.Concat(spec.Containers, spec.InitContainers), func(o corev1.Container) bool { return o.Name == r.ContainerName }) {
					bad("container %q env %q: resourceFieldRef names unknown container %q", c.Name, e.Name, r.ContainerName)
				}
				// An unset (zero) divisor defaults to 1; anything else must be a unit.
				if !r.Divisor.IsZero() && !slices.ContainsFunc([]string{"1", "1m", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei"},
					func(s string) bool { return r.Divisor.Cmp(resource.MustParse(s)) == 0 }) {
					bad("container %q env %q: divisor %s is not allowed", c.Name, e.Name, r.Divisor.String())
				}
			}
		}
		if sc := c.SecurityContext; sc != nil && sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			if sc.Privileged != nil && *sc.Privileged {
				bad("container %q: allowPrivilegeEscalation false with privileged", c.Name)
			}
			if sc.Capabilities != nil && slices.ContainsFunc(sc.Capabilities.Add, func(c corev1.Capability) bool {
				return c == "SYS_ADMIN" || c == "CAP_SYS_ADMIN"
			}) {
				bad("container %q: allowPrivilegeEscalation false with SYS_ADMIN", c.Name)
			}
		}
	}
	for _, c := range spec.InitContainers {
		check(c, true)
	}
	for _, c := range spec.Containers {
		check(c, false)
	}
	if len(spec.Containers) == 0 {
		bad("no containers")
	}
	return probs
}

// podSpecOf returns the pod spec of a workload object, if it has one.
func podSpecOf(v any) (*metav1.ObjectMeta, *corev1.PodSpec, bool) {
	switch o := v.(type) {
	case *corev1.Pod:
		return &o.ObjectMeta, &o.Spec, true
	case *appsv1.Deployment:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec, true
	case *appsv1.StatefulSet:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec, true
	case *appsv1.DaemonSet:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec, true
	case *batchv1.Job:
		return &o.Spec.Template.ObjectMeta, &o.Spec.Template.Spec, true
	case *batchv1.CronJob:
		return &o.Spec.JobTemplate.Spec.Template.ObjectMeta, &o.Spec.JobTemplate.Spec.Template.Spec, true
	}
	return nil, nil, false
}

// Binary variants: the image's (as deploy/Dockerfile builds it, without
// inject) and the workstation CLI's (with inject, as the kind demo builds it).
const (
	imageBinary = "image"
	cliBinary   = "cli"
)

var (
	binMu    sync.Mutex
	binDir   string
	binPaths = map[string]string{}
	binErrs  = map[string]error{}
)

// meshproxyBinary builds ./cmd/meshproxy once per variant, as every test
// does (e2eutil.BuildCommand: the shipped flags, one compile cache with
// make lint's go vet and staticcheck).
func meshproxyBinary(t *testing.T, variant string) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("go tool not on PATH")
	}
	var err error
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := binPaths[variant]; ok {
		return p
	}
	if err, ok := binErrs[variant]; ok {
		t.Fatal(err)
	}
	if binDir == "" {
		if binDir, err = os.MkdirTemp("", "meshproxy-deploy-test-"); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(binDir, "meshproxy-"+variant)
	args := []string{"-ldflags", "-s -w -X main.version=deploytest"}
	if variant == imageBinary {
		args = append(args, "-tags", "noinject,nocloudca") // as deploy/Dockerfile builds it
	}
	if o := os.Getenv("MESHPROXY_TEST_OVERLAY"); o != "" {
		args = append(args, "-overlay", o) // lets a developer check against work in progress
	}
	cmd := e2eutil.BuildCommand(context.Background(), p, args...)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		binErrs[variant] = fmt.Errorf("go build ./cmd/meshproxy (%s): %v\n%s", variant, err, out)
		t.Fatal(binErrs[variant])
	}
	binPaths[variant] = p
	return p
}

var helpFlagRe = regexp.MustCompile(`(?m)^\s+(?:-(\w), )?--([a-z0-9][a-z0-9-]*)`)

// helpFlags returns the flags `meshproxy ARGS... --help` lists: long names
// without dashes, shorthands as "-x".
func helpFlags(t *testing.T, bin string, args ...string) []string {
	t.Helper()
	out, err := exec.Command(bin, append(args, "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("meshproxy %s --help: %v\n%s", strings.Join(args, " "), err, out)
	}
	var flags []string
	for _, m := range helpFlagRe.FindAllStringSubmatch(string(out), -1) {
		if m[1] != "" {
			flags = append(flags, "-"+m[1])
		}
		flags = append(flags, m[2])
	}
	return flags
}
