// Package policy reads the subset of Istio's own policy resources that
// meshproxy enforces — PeerAuthentication, AuthorizationPolicy (L4) and
// DestinationRule — from a directory of YAML/JSON manifests, resolves them
// for one workload (its namespace and labels), and publishes the result as an
// immutable Snapshot that the data plane consults per connection.
//
// A Store loads the directory (*.yaml, *.yml, *.json; multi-document files
// and `kind: List` allowed; dot-entries skipped and symlinks followed, so a
// mounted Kubernetes ConfigMap reads as plain files), watches it with
// fsnotify plus a periodic content check, and swaps snapshots atomically. A
// directory is applied as a whole or not at all: a bad file is logged and
// counted (meshproxy_config_reloads_total{kind="policy",result="failure"}),
// and the last good snapshot stays in force.
//
// Documents are decoded strictly. Errors read
// "FILE: document K: line N: ..." for YAML syntax (N counted from the top of
// the file) and "FILE: document K (Kind namespace/name): FIELD.PATH: ..." for
// content. Fields meshproxy recognises but cannot enforce — L7 attributes
// such as methods, paths or when, JWT request principals, IP blocks,
// load-balancing settings — are errors naming the field, never silently
// ignored. Other kinds are ignored.
//
// Semantics follow Istio's:
//   - PeerAuthentication: mesh (root namespace, no selector) → namespace →
//     workload (selector matching the labels) → its portLevelMtls; UNSET
//     inherits; the oldest policy (then name) wins a tie.
//   - AuthorizationPolicy: policies of the workload's namespace and the root
//     namespace whose selector matches; DENY first, then, if any ALLOW policy
//     applies, one must match. A peer without mesh mTLS has no principal or
//     namespace: it never matches principals/namespaces, and so always
//     satisfies notPrincipals/notNamespaces (Istio's "require mTLS" DENY
//     policy, notPrincipals: ["*"], refuses it). A namespace admits only
//     an ID of the form /ns/NS/sa/SA; where it refuses (a DENY rule's
//     namespaces, an ALLOW rule's notNamespaces) it also matches, as Istio's
//     ".*/ns/NS/.*" does, /ns/NS/ anywhere in the ID. The trust domain
//     "cluster.local" in a principal stands for the mesh's own.
//   - DestinationRule: host as IP, CIDR, "*" or DNS name (resolved and
//     refreshed); the most specific address wins, then a port-level setting
//     over the rule-level one. exportTo and workloadSelector are honoured.
//
// A policy without metadata.namespace belongs to the workload's namespace.
package policy
