//go:build tools

// Package spire pins the SPIRE server and agent that meshproxy's Workload
// API tests run against. It is a module of its own so that SPIRE's large
// dependency graph stays out of meshproxy's go.mod; nothing imports it.
// scripts/test-tools.sh (make tools) builds the binaries, minus the plugins
// the tests never use.
package spire

import (
	_ "github.com/spiffe/spire/cmd/spire-agent"
	_ "github.com/spiffe/spire/cmd/spire-server"
)
