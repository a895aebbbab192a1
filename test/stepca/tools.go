//go:build tools

// Package stepca pins the step-ca server that meshproxy's external-CA tests
// (package ca/stepca) run against. It is a module of its own so that
// step-ca's large dependency graph stays out of meshproxy's go.mod; nothing
// imports it. scripts/test-tools.sh (make tools) builds the binary, minus the
// cloud KMS and CA services the tests never use.
package stepca

import (
	_ "github.com/smallstep/certificates/cmd/step-ca"
)
