// Package nodeagent puts meshproxy's CNI plugin on a node and keeps it
// there (`meshproxy node-agent`, a privileged DaemonSet): it copies the
// plugin binary into the CNI bin directory, chains the plugin's entry at
// the end of the node's primary network configuration list, and writes
// the kubeconfig the plugin reads pods with (the agent's own service
// account token, refreshed as it rotates).
//
// Every write is atomic (a temporary file renamed into place) and
// idempotent: an unchanged file is not rewritten. The agent re-applies its
// entry when the primary CNI rewrites the list. Stopping or restarting the
// agent changes nothing on the node, so running pods keep their capture and
// new pods keep getting it during an upgrade; Uninstall removes the entry,
// the kubeconfig and the binary, after which pods created on the node no
// longer get capture (and injected ones fail their validation).
package nodeagent
