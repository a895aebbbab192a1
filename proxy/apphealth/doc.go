// Package apphealth runs the application's own Kubernetes probes for the
// kubelet, as Istio's pilot-agent does for rewritten probes.
//
// Under STRICT mTLS the kubelet's plaintext probes to the application's
// ports are refused by inbound capture, so `meshproxy inject` rewrites every
// httpGet, tcpSocket and grpc probe of an application container into an
// httpGet on the sidecar's health port (15021) at
// /app-health/CONTAINER/livez|readyz|startupz, and hands the original probes
// to the sidecar as JSON (--app-probers, env MESHPROXY_APP_PROBERS; the
// format of Istio's ISTIO_KUBE_APP_PROBERS). The Handler serves those paths:
// it performs the original probe against the application locally — an HTTP
// GET with the original path, headers and scheme (HTTPS without certificate
// verification, as the kubelet does), a TCP connect, or a
// grpc.health.v1.Health/Check — within the probe's timeout, and answers 200
// when it succeeds and 503 with the reason when it fails.
//
// The Handler is no proxy: only the configured probes can be run, and the
// target is always this pod — the local address the kubelet's request
// arrived on (the pod IP, as the kubelet would have probed), or loopback —
// with the port from the configuration. The JSON has no host field at all.
package apphealth
