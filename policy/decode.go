package policy

import (
	"maps"
	"slices"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// fieldErrorf returns an error at one field path of a document
// (spec.rules[0].to[0].operation.methods: ...), in the shared manifest
// format the loader prefixes with the file and document.
func fieldErrorf(path, format string, args ...any) error {
	return manifest.Errorf(path, format, args...)
}

// sortedKeys returns m's keys in order, to report errors deterministically.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
