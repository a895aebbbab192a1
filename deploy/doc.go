// Package deploy holds what runs meshproxy outside a developer's machine,
// and the tests that keep it honest; it has no Go code of its own:
//
//   - Dockerfile (+ Dockerfile.dockerignore): the one static image that
//     serves as CA, capture init container and sidecar;
//   - kubernetes/: the kustomize base (namespace istio-system, the CA
//     Deployment and Services, its RBAC, the mesh-wide STRICT policy) and
//     samples/ (a client, an echo server, their policy) to inject;
//   - kind/: demo.sh and down.sh, the whole flow on a local kind cluster;
//   - observability/: alert rules with promtool unit tests, a Grafana
//     dashboard, and PodMonitor/ServiceMonitor for the Prometheus operator.
//
// The tests decode every manifest strictly into the k8s.io/api types (the
// Istio policies into istio.io/api), load the sample policies with the
// sidecar's own policy package, inject the samples and check the pod specs
// against the API server's rules that matter here, run promtool and
// shellcheck, parse the Dockerfile, and build the binary to check its size
// and that every flag the manifests pass exists.
package deploy
