// Package policy reads the subset of Istio's own policy resources that
// meshproxy enforces — PeerAuthentication, AuthorizationPolicy (L4) and
// DestinationRule — from a directory of YAML/JSON manifests, resolves them
// for one workload (its namespace and labels), and publishes the result as an
// immutable Snapshot that the data plane consults per connection.
//
// A Store loads the directory (*.yaml, *.yml, *.json; multi-document files
// and `kind: List` allowed; dot-entries skipped and symlinks followed, so a
// mounted Kubernetes ConfigMap reads as plain files), watches it with
// fsnotify plus a periodic content check, and swaps snapshots atomically.
//
// Documents are loaded one by one (Load: a function of file names and
// bytes, so a Kubernetes mirror can feed it too). Each is applied, applied
// with warnings (a field narrowed or ignored, named with its reason),
// dry-run, or rejected alone: invalid by Istio's own validation, or a
// feature that cannot be honoured safely. A rejected document is logged
// with its file, index, field and reason, counted in
// meshproxy_config_documents{kind,result}, listed by GET /config, and
// fails closed for what it selects (a DENY or CUSTOM policy denies, an
// ALLOW policy allows nothing, a STRICT PeerAuthentication stays STRICT, a
// TLS-origination DestinationRule refuses); the other documents apply.
// WithStrictConfig restores all-or-nothing loading.
//
// Documents are decoded strictly. Errors read
// "FILE: document K: line N: ..." for YAML syntax (N counted from the top of
// the file) and "FILE: document K (Kind namespace/name): FIELD.PATH: ..." for
// content. Other kinds are ignored.
//
// Semantics follow Istio's:
//   - PeerAuthentication: mesh (root namespace, no selector) → namespace →
//     workload (selector matching the labels) → its portLevelMtls; UNSET
//     inherits; the oldest policy (then name) wins a tie.
//   - AuthorizationPolicy: policies of the workload's namespace and the root
//     namespace whose selector matches; DENY first, then, if any ALLOW policy
//     applies, one must match. Istio's TCP semantics: every L4 attribute is
//     honoured (principals, namespaces, trustDomains, serviceAccounts,
//     ipBlocks and remoteIpBlocks on the peer address, ports, and `when` on
//     source.ip, remote.ip, source.namespace, source.principal,
//     source.trustDomain, source.serviceAccount, destination.ip,
//     destination.port, connection.sni); an ALLOW rule needing an HTTP-only
//     attribute never matches, a DENY rule is applied without it; AUDIT
//     decides nothing; CUSTOM is rejected and denies what its rules cover;
//     istio.io/dry-run policies are evaluated and counted
//     (meshproxy_authz_dry_run_total), never enforced. A peer without mesh mTLS has no principal or
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
