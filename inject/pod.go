//go:build !noinject

package inject

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/meshproxy/meshproxy/internal/ports"
)

const (
	tokenVolume   = "meshproxy-token"
	caRootVolume  = "meshproxy-ca-root"
	podinfoVolume = "meshproxy-podinfo"
	policyVolume  = "meshproxy-policy"
	cgroupVolume  = "meshproxy-host-cgroup"
	bpffsVolume   = "meshproxy-bpffs"
	xtablesVolume = "meshproxy-run"
	tokenDir      = "/var/run/secrets/tokens"
	tokenFile     = "istio-token"
	caRootDir     = "/var/run/secrets/meshproxy/ca"
	caRootFile    = "root-cert.pem"
	podinfoDir    = "/etc/podinfo"
	labelsFile    = "labels"
	policyDir     = "/etc/meshproxy/config"
	bpffsPath     = "/sys/fs/bpf"
	inboundPort   = ports.Inbound
	outboundPort  = ports.Outbound
	metricsPath   = "/stats/prometheus"
	readyPath     = "/healthz/ready"
)

// status is the value of StatusAnnotation: what was added, so a second
// injection can take exactly that out before adding it again.
type status struct {
	Version        string   `json:"version"`
	InitContainers []string `json:"initContainers"`
	Containers     []string `json:"containers,omitempty"`
	Volumes        []string `json:"volumes"`
}

// ownedVolumes lists the volumes injection adds.
func (c *config) ownedVolumes() []string {
	v := []string{tokenVolume, caRootVolume, podinfoVolume, policyVolume}
	if c.initCaptures(ModeEBPF) {
		v = append(v, cgroupVolume, bpffsVolume)
	}
	if c.initCaptures(ModeIPTables) {
		v = append(v, xtablesVolume)
	}
	return v
}

func (c *config) status() status {
	s := status{Version: c.version, InitContainers: []string{c.captureStepName()}, Volumes: c.ownedVolumes()}
	if c.native {
		s.InitContainers = append(s.InitContainers, SidecarName)
	} else {
		s.Containers = []string{SidecarName}
	}
	return s
}

// initContainer is meshproxy-init: it installs the capture and exits.
func (c *config) initContainer() corev1.Container {
	args := []string{"redirect", "install",
		"--mode", string(c.mode),
		"--proxy-uid", strconv.FormatInt(c.proxyUID, 10),
		"--inbound-port", strconv.Itoa(inboundPort),
		"--outbound-port", strconv.Itoa(outboundPort),
	}
	if len(c.excludeInboundPorts) > 0 {
		args = append(args, "--exclude-inbound-ports", portList(c.excludeInboundPorts))
	}
	if len(c.excludeOutboundCIDRs) > 0 {
		args = append(args, "--exclude-outbound-cidrs", prefixList(c.excludeOutboundCIDRs))
	}
	sc := &corev1.SecurityContext{
		RunAsUser:                ptr(int64(0)),
		RunAsGroup:               ptr(int64(0)),
		RunAsNonRoot:             ptr(false),
		Privileged:               ptr(false),
		AllowPrivilegeEscalation: ptr(false),
		ReadOnlyRootFilesystem:   ptr(true),
		Capabilities: &corev1.Capabilities{
			Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
			Drop: []corev1.Capability{"ALL"},
		},
		SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
	}
	ctr := corev1.Container{
		Name:            InitContainerName,
		Image:           c.image,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Args:            args,
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("10m"),
				corev1.ResourceMemory: resource.MustParse("16Mi"),
			},
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("128Mi")},
		},
		SecurityContext: sc,
	}
	if c.mode == ModeIPTables {
		// iptables-restore takes /run/xtables.lock; the root stays read-only.
		ctr.VolumeMounts = []corev1.VolumeMount{{Name: xtablesVolume, MountPath: "/run"}}
	}
	if c.mode == ModeEBPF {
		// Loading cgroup BPF programs needs BPF (SYS_ADMIN on kernels before
		// 5.8 and for runtimes whose seccomp profile gates bpf() on it);
		// attaching to the pod's cgroup needs the host cgroup hierarchy,
		// since the container's own cgroup namespace hides the pod's; the
		// pinned programs outlive this container in the host bpffs.
		// Kubernetes refuses allowPrivilegeEscalation: false with SYS_ADMIN.
		sc.Capabilities.Add = append(sc.Capabilities.Add, "BPF", "SYS_ADMIN")
		sc.AllowPrivilegeEscalation = nil
		ctr.Args = append(ctr.Args, "--cgroup", c.ebpfCgroup)
		if c.ebpfCgroup == EBPFCgroupAuto {
			ctr.Args = append(ctr.Args, "--pod-uid", "$(POD_UID)", "--cgroup-root", hostCgroupMount)
		}
		ctr.Env = []corev1.EnvVar{fieldEnv("POD_UID", "metadata.uid")}
		ctr.VolumeMounts = []corev1.VolumeMount{
			{Name: cgroupVolume, MountPath: hostCgroupMount, ReadOnly: true},
			{Name: bpffsVolume, MountPath: bpffsPath},
		}
	}
	return ctr
}

// sidecar is the meshproxy container.
func (c *config) sidecar() corev1.Container {
	args := []string{"run",
		"--ca-addr", c.caAddr,
		"--ca-root", caRootDir + "/" + caRootFile,
		"--token-file", tokenDir + "/" + tokenFile,
		"--inbound", ":" + strconv.Itoa(inboundPort),
		"--outbound", ":" + strconv.Itoa(outboundPort),
	}
	if len(c.meshCIDRs) > 0 {
		args = append(args, "--mesh-cidrs", prefixList(c.meshCIDRs))
	}
	if c.configServer != "" {
		args = append(args, "--config-server", c.configServer)
	}
	if c.csrTrustDomain != "" {
		// The kubelet expands both from the container's environment.
		args = append(args, "--ca-spiffe-id", "spiffe://"+c.csrTrustDomain+"/ns/$(POD_NAMESPACE)/sa/$(POD_SERVICE_ACCOUNT)")
	}
	args = append(args,
		"--config-dir", policyDir,
		"--namespace", "$(POD_NAMESPACE)",
		"--labels-file", podinfoDir+"/"+labelsFile,
	)
	ready := func(period, failures int32) *corev1.Probe {
		return &corev1.Probe{
			ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
				Path: readyPath, Port: intstr.FromInt32(HealthPort),
			}},
			PeriodSeconds:    period,
			TimeoutSeconds:   3,
			FailureThreshold: failures,
		}
	}
	ctr := corev1.Container{
		Name:            SidecarName,
		Image:           c.image,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Args:            args,
		Env: []corev1.EnvVar{
			fieldEnv("POD_NAMESPACE", "metadata.namespace"),
			{Name: "GOMEMLIMIT", ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{
				Resource: "limits.memory", Divisor: resource.MustParse("1"),
			}}},
		},
		Ports: []corev1.ContainerPort{
			{Name: MetricsPortName, ContainerPort: MetricsPort, Protocol: corev1.ProtocolTCP},
			{Name: HealthPortName, ContainerPort: HealthPort, Protocol: corev1.ProtocolTCP},
		},
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("50m"),
				corev1.ResourceMemory: resource.MustParse("64Mi"),
			},
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("512Mi")},
		},
		VolumeMounts: []corev1.VolumeMount{
			{Name: tokenVolume, MountPath: tokenDir, ReadOnly: true},
			{Name: caRootVolume, MountPath: caRootDir, ReadOnly: true},
			{Name: podinfoVolume, MountPath: podinfoDir, ReadOnly: true},
			// Written by the sidecar itself when it follows --config-server.
			{Name: policyVolume, MountPath: policyDir, ReadOnly: c.configServer == ""},
		},
		ReadinessProbe: ready(5, 3),
		// Holds the application (native sidecar) until the certificate is
		// loaded; up to 10 minutes for a CA that is still starting.
		StartupProbe: ready(1, 600),
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr(c.proxyUID),
			RunAsGroup:               ptr(c.proxyUID),
			RunAsNonRoot:             ptr(true),
			Privileged:               ptr(false),
			AllowPrivilegeEscalation: ptr(false),
			ReadOnlyRootFilesystem:   ptr(true),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
	}
	if c.csrTrustDomain != "" {
		ctr.Env = append(ctr.Env, fieldEnv("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"))
	}
	if c.native {
		ctr.RestartPolicy = ptr(corev1.ContainerRestartPolicyAlways)
	}
	return ctr
}

// policyVolume is the namespace's policy ConfigMap, or with a config
// server the in-memory directory the sidecar writes the mirrored policy to.
func (c *config) policyVolume() corev1.Volume {
	if c.configServer != "" {
		return corev1.Volume{Name: policyVolume, VolumeSource: corev1.VolumeSource{
			EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory, SizeLimit: ptr(resource.MustParse("16Mi"))},
		}}
	}
	return corev1.Volume{Name: policyVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
		LocalObjectReference: corev1.LocalObjectReference{Name: PolicyConfigMap},
		Optional:             ptr(true),
	}}}
}

// volumes are the sidecar's (and in ebpf mode the init container's) volumes.
func (c *config) volumes() []corev1.Volume {
	vols := []corev1.Volume{
		{Name: tokenVolume, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: TokenAudience, ExpirationSeconds: ptr(int64(tokenExpirationSeconds)), Path: tokenFile,
			}}},
		}}},
		{Name: caRootVolume, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: CARootConfigMap},
			Items:                []corev1.KeyToPath{{Key: caRootFile, Path: caRootFile}},
		}}},
		{Name: podinfoVolume, VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
			Items: []corev1.DownwardAPIVolumeFile{{Path: labelsFile, FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}}},
		}}},
		c.policyVolume(),
	}
	if c.initCaptures(ModeIPTables) {
		vols = append(vols, corev1.Volume{Name: xtablesVolume, VolumeSource: corev1.VolumeSource{
			EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory, SizeLimit: ptr(resource.MustParse("1Mi"))},
		}})
	}
	if c.initCaptures(ModeEBPF) {
		vols = append(vols,
			corev1.Volume{Name: cgroupVolume, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
				Path: "/sys/fs/cgroup", Type: ptr(corev1.HostPathDirectory),
			}}},
			corev1.Volume{Name: bpffsVolume, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
				Path: bpffsPath, Type: ptr(corev1.HostPathDirectory),
			}}},
		)
	}
	return vols
}

// skipReason says why a pod is left alone, or "" to inject it.
func skipReason(annotations, labels map[string]string, spec *corev1.PodSpec) string {
	for _, key := range []string{InjectAnnotation, IstioInjectAnnotation} {
		if v, ok := annotations[key]; ok && strings.EqualFold(v, "false") {
			return fmt.Sprintf("opted out (annotation %s: %q)", key, v)
		}
		if v, ok := labels[key]; ok && strings.EqualFold(v, "false") {
			return fmt.Sprintf("opted out (label %s: %q)", key, v)
		}
	}
	if spec.HostNetwork {
		return "hostNetwork: capture would redirect the node's own traffic"
	}
	if _, ok := annotations[istioStatusAnnotation]; ok {
		return "already has an Istio sidecar (" + istioStatusAnnotation + ")"
	}
	for _, ctr := range slices.Concat(spec.InitContainers, spec.Containers) {
		if ctr.Name == "istio-proxy" || ctr.Name == "istio-init" {
			return "already has an Istio sidecar (container " + ctr.Name + ")"
		}
	}
	return ""
}

// podTemplate injects into the generic pod template tmpl (an object with
// metadata and spec), whose typed form has already been validated. field
// is tmpl's path, for errors.
func (c *config) podTemplate(tmpl object, field string) error {
	meta, err := childMap(tmpl, "metadata", field)
	if err != nil {
		return err
	}
	spec, err := childMap(tmpl, "spec", field)
	if err != nil {
		return err
	}
	annotations, err := childMap(meta, "annotations", field+"metadata.")
	if err != nil {
		return err
	}
	labels, err := childMap(meta, "labels", field+"metadata.")
	if err != nil {
		return err
	}

	// Take out what an earlier injection added.
	var prev status
	if raw, ok := annotations[StatusAnnotation]; ok {
		s, _ := raw.(string)
		if err := json.Unmarshal([]byte(s), &prev); err != nil {
			return &fieldError{field: field + "metadata.annotations[" + StatusAnnotation + "]", err: fmt.Errorf("not meshproxy's status JSON: %w", err)}
		}
	}
	ours := slices.Concat(prev.InitContainers, prev.Containers)
	initCtrs := withoutNames(listAt(spec, "initContainers"), ours)
	ctrs := withoutNames(listAt(spec, "containers"), ours)
	vols := withoutNames(listAt(spec, "volumes"), prev.Volumes)

	// Whatever is left must not collide with what we add.
	for _, list := range []struct {
		name  string
		items []any
		taken []string
	}{
		{"initContainers", initCtrs, []string{InitContainerName, ValidationContainerName, SidecarName}},
		{"containers", ctrs, []string{InitContainerName, ValidationContainerName, SidecarName}},
		{"volumes", vols, c.ownedVolumes()},
	} {
		for i, item := range list.items {
			if n := nameOf(item); slices.Contains(list.taken, n) {
				return &fieldError{field: fmt.Sprintf("%sspec.%s[%d].name", field, list.name, i),
					err: fmt.Errorf("%q is reserved for meshproxy; rename it", n)}
			}
		}
	}
	if len(ctrs) == 0 {
		return &fieldError{field: field + "spec.containers", err: fmt.Errorf("no containers")}
	}

	// Probes of the application that the capture would refuse go through us.
	probers, err := probes(annotations, [][]any{initCtrs, ctrs}, []string{"initContainers", "containers"}, field)
	if err != nil {
		return err
	}
	initCtr, err := toGeneric(c.captureStep())
	if err != nil {
		return err
	}
	sc := c.sidecar()
	if len(probers) > 0 {
		js, err := probers.JSON()
		if err != nil {
			return err
		}
		sc.Env = append(sc.Env, corev1.EnvVar{Name: AppProbersEnv, Value: js})
	}
	sidecar, err := toGeneric(sc)
	if err != nil {
		return err
	}
	if c.native {
		initCtrs = slices.Concat([]any{initCtr, sidecar}, initCtrs)
	} else {
		initCtrs = slices.Concat([]any{initCtr}, initCtrs)
		ctrs = append(ctrs, sidecar)
	}
	for _, v := range c.volumes() {
		gv, err := toGeneric(v)
		if err != nil {
			return err
		}
		vols = append(vols, gv)
	}
	spec["initContainers"], spec["containers"], spec["volumes"] = initCtrs, ctrs, vols

	st, err := json.Marshal(c.status())
	if err != nil {
		return fmt.Errorf("status annotation: %w", err)
	}
	annotations[StatusAnnotation] = string(st)
	c.setCaptureAnnotations(annotations, len(ours) > 0)
	// The application's own scrape settings win; the PodMonitor reaches us anyway.
	setDefault(annotations, "prometheus.io/scrape", "true")
	setDefault(annotations, "prometheus.io/port", strconv.Itoa(MetricsPort))
	setDefault(annotations, "prometheus.io/path", metricsPath)
	// kubectl logs/exec keep going to the application, not to us.
	setDefault(annotations, defaultContainerKey, nameOf(ctrs[0]))
	labels[InjectedLabel] = "true"
	return nil
}

func setDefault(m object, key, value string) {
	if _, ok := m[key]; !ok {
		m[key] = value
	}
}

func withoutNames(items []any, names []string) []any {
	out := make([]any, 0, len(items))
	for _, item := range items {
		if !slices.Contains(names, nameOf(item)) {
			out = append(out, item)
		}
	}
	return out
}

func nameOf(item any) string {
	m, _ := item.(object)
	n, _ := m["name"].(string)
	return n
}

func listAt(m object, key string) []any {
	l, _ := m[key].([]any)
	return l
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}}
}

func ptr[T any](v T) *T { return &v }

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func portList(ps []uint16) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = strconv.Itoa(int(p))
	}
	return strings.Join(s, ",")
}
