//go:build tools

// Package tools pins ghostunnel for the comparison harness.
package tools

import _ "github.com/ghostunnel/ghostunnel"
