//go:build !noinject

package inject

import (
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/redirect"
)

// validationUID runs the validation container: not root (restricted Pod
// Security) and not the proxy's uid, whose traffic capture exempts.
const validationUID = 65532

// initCaptures reports whether the pod's own init container installs
// capture of mode m (not the node).
func (c *config) initCaptures(m Mode) bool { return c.capture != CaptureNode && c.mode == m }

// captureStepName is the first init container: the capture step, or in
// node mode the validation of the node's capture.
func (c *config) captureStepName() string {
	if c.capture == CaptureNode {
		return ValidationContainerName
	}
	return InitContainerName
}

// captureStep is the init container that runs first.
func (c *config) captureStep() corev1.Container {
	if c.capture == CaptureNode {
		return c.validationContainer()
	}
	return c.initContainer()
}

// validationContainer checks, with no capability at all, that the node
// installed the pod's capture before anything else starts; the pod does not
// start otherwise. It meets the restricted Pod Security Standard.
func (c *config) validationContainer() corev1.Container {
	uid := int64(validationUID)
	if uid == c.proxyUID {
		uid++
	}
	return corev1.Container{
		Name:            ValidationContainerName,
		Image:           c.image,
		ImagePullPolicy: corev1.PullIfNotPresent,
		Args:            []string{"cni", "validate", "--outbound-port", strconv.Itoa(outboundPort)},
		Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{
				corev1.ResourceCPU:    resource.MustParse("10m"),
				corev1.ResourceMemory: resource.MustParse("16Mi"),
			},
			Limits: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
		},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr(uid),
			RunAsGroup:               ptr(uid),
			RunAsNonRoot:             ptr(true),
			Privileged:               ptr(false),
			AllowPrivilegeEscalation: ptr(false),
			ReadOnlyRootFilesystem:   ptr(true),
			Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
			SeccompProfile:           &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
		},
	}
}

// setCaptureAnnotations writes what the node's CNI plugin reads in node
// mode; a re-injection first drops what an earlier one wrote.
func (c *config) setCaptureAnnotations(annotations object, injectedBefore bool) {
	if injectedBefore {
		for _, k := range podcapture.Keys() {
			delete(annotations, k)
		}
	}
	if c.capture != CaptureNode {
		return
	}
	for k, v := range podcapture.Annotations(c.captureConfig()) {
		annotations[k] = v
	}
}

// captureConfig is the capture the node installs for the pod.
func (c *config) captureConfig() redirect.Config {
	return redirect.Config{
		Mode:                 redirect.Mode(c.mode),
		ProxyUID:             uint32(c.proxyUID),
		ExcludeInboundPorts:  c.excludeInboundPorts,
		ExcludeOutboundCIDRs: c.excludeOutboundCIDRs,
	}
}
