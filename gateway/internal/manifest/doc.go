// Package manifest reads Kubernetes-style YAML/JSON manifests from a
// directory the way meshproxy's config loaders need: every *.yaml, *.yml and
// *.json file (following the symlinks of a mounted ConfigMap), split into
// documents, each converted to JSON and decoded strictly into Go structs.
//
// Strict means an unknown or misspelt field is an error, and a field typed
// Unsupported (an Istio field meshproxy recognises but cannot honour) is an
// error saying why; every error carries the full field path
// (spec.servers[0].tls.mode), and callers prefix the file and document.
// It follows the approach of the policy package's decoder.
package manifest
