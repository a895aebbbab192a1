#!/usr/bin/env bash
# Delete the kind cluster of the meshproxy demo.
set -euo pipefail

CLUSTER="${CLUSTER:-meshproxy}"

if ! command -v kind >/dev/null 2>&1; then
	echo "kind is not installed: nothing to delete (https://kind.sigs.k8s.io/docs/user/quick-start/)" >&2
	exit 1
fi
clusters="$(kind get clusters 2>/dev/null || true)"
if grep -qx "$CLUSTER" <<<"$clusters"; then
	kind delete cluster --name "$CLUSTER"
else
	echo "no kind cluster named $CLUSTER"
fi
