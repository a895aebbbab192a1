package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshproxy/meshproxy/redirect"
)

// PluginType is the plugin's binary name in the CNI bin directory and its
// "type" in the network configuration.
const PluginType = "meshproxy-cni"

// Defaults of the plugin configuration.
const (
	DefaultStateDir   = "/var/run/meshproxy/cni"
	DefaultCgroupRoot = "/sys/fs/cgroup"
)

// DefaultExcludeNamespaces are never captured by the plugin.
var DefaultExcludeNamespaces = []string{"kube-system"}

// Supported lists the CNI versions the plugin speaks: chaining (and so a
// prevResult) exists since 0.3.0.
var Supported = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Conf is the plugin's entry in a network configuration list.
type Conf struct {
	types.NetConf
	// Kubeconfig gives the API server and the credentials pods are read
	// with; the node agent writes it.
	Kubeconfig string `json:"kubeconfig"`
	// Mode is the capture of pods that name none (default nftables).
	Mode redirect.Mode `json:"mode,omitempty"`
	// ExcludeNamespaces are left untouched without asking the API server.
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
	// StateDir keeps one record per captured container, for DEL and CHECK.
	StateDir string `json:"stateDir,omitempty"`
	// CgroupRoot is the node's cgroup v2 mount, below which pods' cgroups
	// are found for ebpf mode.
	CgroupRoot string `json:"cgroupRoot,omitempty"`
	// BPFFS is where eBPF programs are pinned (default /sys/fs/bpf).
	BPFFS string `json:"bpffs,omitempty"`
	// RuntimeConfig carries the runtime's cgroupPath capability, when the
	// runtime passes it.
	RuntimeConfig struct {
		CgroupPath string `json:"cgroupPath,omitempty"`
	} `json:"runtimeConfig,omitzero"`
}

// ParseConf decodes and validates the configuration on the plugin's stdin,
// including prevResult.
func ParseConf(data []byte) (*Conf, error) {
	c := &Conf{}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, fmt.Errorf("parse network configuration: %w", err)
	}
	if c.Mode == "" {
		c.Mode = redirect.ModeNftables
	}
	if !slices.Contains(redirect.Modes, c.Mode) {
		return nil, fmt.Errorf("network configuration: mode %q: want nftables, iptables or ebpf", c.Mode)
	}
	if c.ExcludeNamespaces == nil {
		c.ExcludeNamespaces = DefaultExcludeNamespaces
	}
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.CgroupRoot == "" {
		c.CgroupRoot = DefaultCgroupRoot
	}
	for name, p := range map[string]string{"stateDir": c.StateDir, "cgroupRoot": c.CgroupRoot, "bpffs": c.BPFFS} {
		if p != "" && !filepath.IsAbs(p) {
			return nil, fmt.Errorf("network configuration: %s %q: want an absolute path", name, p)
		}
	}
	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.NetConf); err != nil {
			return nil, fmt.Errorf("network configuration: prevResult: %w", err)
		}
	}
	return c, nil
}

// errFirst is returned when the plugin is run without a previous plugin.
var errFirst = errors.New("meshproxy-cni is a chained plugin: put it after the plugin that creates the pod's interface (no prevResult)")

// podRef is the pod a CNI call is about, from CNI_ARGS.
type podRef struct {
	Namespace, Name, UID string
}

func (p podRef) String() string { return p.Namespace + "/" + p.Name }

// parseArgs reads the Kubernetes keys of CNI_ARGS ("K=V;K=V"). ok is false
// when the container is not a Kubernetes pod.
func parseArgs(s string) (ref podRef, ok bool, err error) {
	for kv := range strings.SplitSeq(s, ";") {
		k, v, found := strings.Cut(kv, "=")
		if !found {
			continue
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			ref.Namespace = v
		case "K8S_POD_NAME":
			ref.Name = v
		case "K8S_POD_UID":
			ref.UID = v
		}
	}
	if ref.Namespace == "" && ref.Name == "" {
		return podRef{}, false, nil
	}
	for what, v := range map[string]string{"K8S_POD_NAMESPACE": ref.Namespace, "K8S_POD_NAME": ref.Name} {
		if len(validation.IsDNS1123Subdomain(v)) > 0 { // namespace and pod names
			return podRef{}, false, fmt.Errorf("CNI_ARGS %s %q: not a Kubernetes name", what, v)
		}
	}
	return ref, true, nil
}

// validContainerID is the CNI spec's rule for container IDs:
// ^[a-zA-Z0-9][a-zA-Z0-9_.\-]{0,254}$.
func validContainerID(id string) bool {
	if len(id) < 1 || len(id) > 255 {
		return false
	}
	for i := range len(id) {
		c := id[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		if !alnum && (i == 0 || c != '_' && c != '.' && c != '-') {
			return false
		}
	}
	return true
}
