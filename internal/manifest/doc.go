// Package manifest reads Kubernetes-style YAML/JSON manifests from a
// directory the way meshproxy's config loaders (policy, gateway) need: every
// *.yaml, *.yml and *.json file (following the symlinks of a mounted
// ConfigMap), split into documents, `kind: List` expanded, each converted to
// JSON and decoded strictly into Go structs.
//
// Strict means an unknown or misspelt field is an error, and a field typed
// Unsupported (an Istio field meshproxy recognises but cannot honour) is an
// error saying why; every error carries the full field path
// (spec.servers[0].tls.mode), and Documents, Objects and DecodeObject
// prefix the file and document ("gw.yaml: document 2 (Gateway ns/name): ").
// YAML syntax errors name the line counted from the top of the file.
package manifest
