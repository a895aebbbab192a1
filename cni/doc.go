// Package cni is meshproxy's chained CNI plugin (`meshproxy cni`, installed
// on the node as meshproxy-cni by `meshproxy node-agent`): it installs a
// pod's traffic capture from the node, during sandbox creation, so the pod
// needs no init container with NET_ADMIN and no container of the pod can
// start before the rules exist.
//
// The plugin runs after the plugin that creates the pod's interface (it
// refuses to run first) and passes that plugin's result on unchanged:
//
//   - ADD: the pod named by CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME) is
//     read from the API server. A pod annotated sidecar.meshproxy.io/capture:
//     node gets exactly what `meshproxy redirect install` installs (the
//     redirect package, with the pod's capture annotations), inside its
//     network namespace (CNI_NETNS); in ebpf mode the programs attach to the
//     pod's cgroup from the node. Any failure on such a pod fails ADD, so
//     the sandbox is not created and the reason shows in the kubelet's
//     events: fail closed. Pods without the annotation, pods of excluded
//     namespaces and non-Kubernetes containers are left untouched. When the
//     API server cannot be asked, ADD fails too: the plugin cannot tell an
//     injected pod from another one.
//   - DEL: removes what ADD installed, from a record ADD keeps per
//     container, so it needs no API server; idempotent, and a missing
//     network namespace is not an error (eBPF pins on the node are
//     still removed).
//   - CHECK: the capture ADD installed is still complete.
//   - VERSION: CNI 0.3.0 to 1.1.0.
package cni
