// Package inject adds meshproxy to Kubernetes workloads, as
// `istioctl kube-inject` does for Istio: for every pod template in a
// manifest it prepends the capture init container (meshproxy-init, running
// `meshproxy redirect install`), adds the sidecar (meshproxy, running
// `meshproxy run` against the CA) with its volumes, and marks the pod
// injected.
//
// How documents are treated:
//
//   - Workloads (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
//     ReplicationController, Job, CronJob, and those inside a kind: List) are
//     first decoded strictly into the k8s.io/api types, so an unknown or
//     duplicate field, or a value of the wrong type, is an error that names
//     the document and the field. The change itself is made on the generic
//     object, never on the typed one, so fields this version of k8s.io/api
//     does not model survive and no defaults (status: {},
//     creationTimestamp: null) are added. An injected document is written
//     back as YAML with sorted keys; its comments are lost.
//   - Every other document, and workloads that opt out, pass through as the
//     exact bytes they came in, comments included: a manifest with nothing
//     to inject comes out byte-identical. They are only checked to be YAML
//     objects with apiVersion and kind; meshproxy has no business rejecting
//     a kind it does not touch.
//
// Injection is idempotent: an injected pod carries the annotation
// sidecar.meshproxy.io/status listing what was added, and injecting again
// first removes exactly that and then adds it anew, so a second pass with
// the same options is byte-identical and a pass with new options (a new
// image) upgrades in place.
//
// The application's httpGet, tcpSocket and grpc probes would be refused
// under STRICT (the kubelet speaks plaintext to a captured port), so they
// are rewritten, as Istio does, to httpGet probes of the sidecar's health
// port at /app-health/CONTAINER/livez|readyz|startupz; the sidecar runs the
// originals locally (package proxy/apphealth), which it gets as
// MESHPROXY_APP_PROBERS. The originals are also kept, exactly as written,
// in the annotation sidecar.meshproxy.io/original-probes, and injecting
// again first puts them back wherever the probe is still the rewritten one.
//
// The sidecar is by default a Kubernetes native sidecar (an init container
// with restartPolicy: Always, Kubernetes 1.29+): it starts after the capture
// rules and before the application, its startup probe holds the
// application until the workload certificate is loaded, and it does not
// keep a Job from completing. WithNativeSidecar(false) puts it among the
// regular containers for older clusters.
package inject
