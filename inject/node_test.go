//go:build !noinject

package inject

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/redirect"
)

// podSecurityViolations checks a pod spec against the Kubernetes Pod
// Security Standards (the checks of the "latest" version of
// k8s.io/pod-security-admission): level "baseline" or "restricted". It
// returns one line per violation.
func podSecurityViolations(spec *corev1.PodSpec, level string) []string {
	var v []string
	bad := func(format string, args ...any) { v = append(v, fmt.Sprintf(format, args...)) }
	if spec.HostNetwork || spec.HostPID || spec.HostIPC {
		bad("host namespaces")
	}
	baselineCaps := []corev1.Capability{"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
		"NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
	restrictedVolumes := func(vol corev1.Volume) bool {
		s := vol.VolumeSource
		return s.ConfigMap != nil || s.CSI != nil || s.DownwardAPI != nil || s.EmptyDir != nil || s.Ephemeral != nil ||
			s.PersistentVolumeClaim != nil || s.Projected != nil || s.Secret != nil
	}
	for _, vol := range spec.Volumes {
		if vol.HostPath != nil {
			bad("volume %s: hostPath", vol.Name)
		} else if level == "restricted" && !restrictedVolumes(vol) {
			bad("volume %s: type not allowed by restricted", vol.Name)
		}
	}
	psc := spec.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	if psc.SeccompProfile != nil && psc.SeccompProfile.Type == corev1.SeccompProfileTypeUnconfined {
		bad("pod seccompProfile Unconfined")
	}
	for _, s := range psc.Sysctls {
		bad("sysctl %s", s.Name)
	}
	if level == "restricted" && psc.RunAsUser != nil && *psc.RunAsUser == 0 {
		bad("pod runAsUser 0")
	}
	for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
		sc := c.SecurityContext
		if sc == nil {
			sc = &corev1.SecurityContext{}
		}
		if sc.Privileged != nil && *sc.Privileged {
			bad("container %s: privileged", c.Name)
		}
		for _, p := range c.Ports {
			if p.HostPort != 0 {
				bad("container %s: hostPort %d", c.Name, p.HostPort)
			}
		}
		if sc.ProcMount != nil && *sc.ProcMount != corev1.DefaultProcMount {
			bad("container %s: procMount", c.Name)
		}
		if sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeUnconfined {
			bad("container %s: seccompProfile Unconfined", c.Name)
		}
		var add, drop []corev1.Capability
		if sc.Capabilities != nil {
			add, drop = sc.Capabilities.Add, sc.Capabilities.Drop
		}
		for _, capa := range add {
			if !slices.Contains(baselineCaps, capa) {
				bad("container %s: capability %s", c.Name, capa)
			} else if level == "restricted" && capa != "NET_BIND_SERVICE" {
				bad("container %s: capability %s (restricted allows only NET_BIND_SERVICE)", c.Name, capa)
			}
		}
		if level != "restricted" {
			continue
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			bad("container %s: allowPrivilegeEscalation != false", c.Name)
		}
		if !slices.Contains(drop, "ALL") {
			bad("container %s: capabilities.drop does not include ALL", c.Name)
		}
		nonRoot := sc.RunAsNonRoot
		if nonRoot == nil {
			nonRoot = psc.RunAsNonRoot
		}
		if nonRoot == nil || !*nonRoot {
			bad("container %s: runAsNonRoot != true", c.Name)
		}
		if sc.RunAsUser != nil && *sc.RunAsUser == 0 {
			bad("container %s: runAsUser 0", c.Name)
		}
		seccomp := sc.SeccompProfile
		if seccomp == nil {
			seccomp = psc.SeccompProfile
		}
		if seccomp == nil || (seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost) {
			bad("container %s: seccompProfile not RuntimeDefault or Localhost", c.Name)
		}
	}
	return v
}

func injectedSpec(t *testing.T, opts ...Option) (*corev1.PodSpec, map[string]string) {
	t.Helper()
	out, _ := mustInject(t, newInjector(t, opts...), readTestdata(t, "restricted.yaml"))
	docs := docsOf(t, out)
	if len(docs) != 2 {
		t.Fatalf("%d documents", len(docs))
	}
	meta, spec := template(t, docs[0].obj)
	return spec, meta.Annotations
}

// TestNodeCaptureMeetsRestrictedPodSecurity: with --capture node, a
// restricted-compliant workload stays compliant in every capture mode and
// sidecar form, while --capture init is refused even by baseline (NET_ADMIN).
func TestNodeCaptureMeetsRestrictedPodSecurity(t *testing.T) {
	if v := podSecurityViolations(&corev1.PodSpec{Containers: []corev1.Container{{Name: "app"}}}, "restricted"); len(v) == 0 {
		t.Fatal("the checker passes a container without any security context")
	}
	for _, mode := range []Mode{ModeNFTables, ModeIPTables, ModeEBPF} {
		for _, native := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/native=%v", mode, native), func(t *testing.T) {
				spec, _ := injectedSpec(t, WithCapture(CaptureNode), WithMode(mode), WithNativeSidecar(native))
				if v := podSecurityViolations(spec, "restricted"); len(v) > 0 {
					t.Fatalf("restricted violations:\n%s", strings.Join(v, "\n"))
				}
				if _, ok := container(spec, InitContainerName); ok {
					t.Fatalf("%s present with node capture", InitContainerName)
				}
				for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
					if c.SecurityContext == nil || c.SecurityContext.Capabilities == nil || len(c.SecurityContext.Capabilities.Add) > 0 {
						t.Errorf("container %s adds capabilities", c.Name)
					}
				}
				side, _ := container(spec, SidecarName)
				if *side.SecurityContext.RunAsUser != DefaultProxyUID || !slices.Contains(side.SecurityContext.Capabilities.Drop, "ALL") {
					t.Errorf("sidecar: %+v", side.SecurityContext)
				}
			})
			t.Run(fmt.Sprintf("init-%s/native=%v", mode, native), func(t *testing.T) {
				spec, _ := injectedSpec(t, WithMode(mode), WithNativeSidecar(native))
				v := podSecurityViolations(spec, "baseline")
				if !slices.ContainsFunc(v, func(s string) bool { return strings.Contains(s, "NET_ADMIN") }) {
					t.Fatalf("init capture passes baseline: %v", v)
				}
			})
		}
	}
}

// TestValidationContainerRunsFirstAsACapturedUser: the validation step runs
// before the sidecar (which then owns the outbound port), as a uid that is
// neither root nor the proxy's (whose traffic capture exempts), and runs
// `meshproxy cni validate` on the outbound port.
func TestValidationContainerRunsFirstAsACapturedUser(t *testing.T) {
	for _, uid := range []int64{DefaultProxyUID, validationUID} {
		spec, _ := injectedSpec(t, WithCapture(CaptureNode), WithProxyUID(uid))
		if names(spec.InitContainers)[0] != ValidationContainerName || names(spec.InitContainers)[1] != SidecarName {
			t.Fatalf("init containers %v: want %s, then %s", names(spec.InitContainers), ValidationContainerName, SidecarName)
		}
		v := spec.InitContainers[0]
		if got := *v.SecurityContext.RunAsUser; got == 0 || got == uid || *v.SecurityContext.RunAsGroup == uid {
			t.Errorf("proxy uid %d: validation runs as %d:%d", uid, got, *v.SecurityContext.RunAsGroup)
		}
		if want := []string{"cni", "validate", "--outbound-port", "15001"}; !reflect.DeepEqual(v.Args, want) {
			t.Errorf("args %v, want %v", v.Args, want)
		}
		if len(v.VolumeMounts) != 0 {
			t.Errorf("validation mounts %v", v.VolumeMounts)
		}
	}
}

// TestNodeCaptureAnnotationsTellTheNodeWhatToInstall: what injection
// writes, the CNI plugin reads back as the capture `meshproxy redirect
// install` would get from the same options.
func TestNodeCaptureAnnotationsTellTheNodeWhatToInstall(t *testing.T) {
	cidr := netip.MustParsePrefix("169.254.169.254/32")
	_, ann := injectedSpec(t, WithCapture(CaptureNode), WithMode(ModeEBPF), WithProxyUID(1400),
		WithExcludeInboundPorts(8443), WithExcludeOutboundCIDRs(cidr))
	got, wanted, err := podcapture.FromAnnotations(ann, redirect.ModeNftables)
	want := redirect.Config{Mode: redirect.ModeEBPF, ProxyUID: 1400, ProxyGID: 1400,
		ExcludeInboundPorts: []uint16{8443}, ExcludeOutboundCIDRs: []netip.Prefix{cidr}}
	if err != nil || !wanted || !reflect.DeepEqual(got, want) {
		t.Fatalf("plugin reads %+v (wanted %v, %v), want %+v", got, wanted, err, want)
	}
	_, ann = injectedSpec(t)
	for _, k := range podcapture.Keys() {
		if _, ok := ann[k]; ok {
			t.Errorf("init capture writes %s", k)
		}
	}
}

// TestReinjectionSwitchesCapture: injecting an injected manifest with the
// other --capture replaces the capture step and its annotations.
func TestReinjectionSwitchesCapture(t *testing.T) {
	node := newInjector(t, WithCapture(CaptureNode), WithMode(ModeIPTables))
	initInj := newInjector(t, WithMode(ModeIPTables))
	first, _ := mustInject(t, node, readTestdata(t, "restricted.yaml"))
	back, _ := mustInject(t, initInj, first)
	direct, _ := mustInject(t, initInj, readTestdata(t, "restricted.yaml"))
	if string(back) != string(direct) {
		t.Fatalf("node then init differs from init alone: %s", firstDiff(back, direct))
	}
	again, _ := mustInject(t, node, back)
	if string(again) != string(first) {
		t.Fatalf("init then node differs from node alone: %s", firstDiff(again, first))
	}
}

// TestNodeCaptureRefusesContradictions: options the node cannot honour
// are errors, not silently dropped.
func TestNodeCaptureRefusesContradictions(t *testing.T) {
	for _, opts := range [][]Option{
		{WithCapture(CaptureNode), WithMode(ModeEBPF), WithEBPFCgroup(hostCgroupMount + "/x")},
		{WithCapture(CaptureNode), WithExcludeOutboundCIDRs(netip.MustParsePrefix("192.0.2.0/24"))},
		{WithCapture("sidecar")},
	} {
		if _, err := New(opts...); err == nil {
			t.Errorf("accepted %d options", len(opts))
		}
	}
}
