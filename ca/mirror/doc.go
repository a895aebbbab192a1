// Package mirror keeps a copy of the Istio custom resources a mesh enforces
// — security.istio.io/v1 PeerAuthentication and AuthorizationPolicy,
// networking.istio.io/v1 DestinationRule, Gateway and VirtualService — by
// listing and watching them at the Kubernetes API server (plain HTTPS and
// JSON, no client-go), and serves each workload the documents it may see
// (its own namespace and the root namespace) over mTLS, as a versioned set
// with long polling. It is the CA's counterpart of istiod's config
// distribution: `kubectl apply` of a policy reaches the sidecars within
// seconds, without waiting for kubelet to refresh a mounted ConfigMap.
//
// The API server identity needs list and watch on exactly those five
// resources (deploy/kubernetes/base/ca-rbac.yaml); a missing permission is
// reported by resource and verb, and the mirror serves nothing until every
// resource has been listed once, so a sidecar never mistakes an unsynced
// mirror for "no policy".
package mirror
