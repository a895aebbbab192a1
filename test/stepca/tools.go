//go:build tools

// Package stepca pins the step-ca server that meshproxy's external-CA tests
// (package ca/stepca) run against. It is a module of its own so that
// step-ca's large dependency graph stays out of meshproxy's go.mod; nothing
// imports it. Build the binary with
//
//	go build -C test/stepca -o DIR/step-ca github.com/smallstep/certificates/cmd/step-ca
package stepca

import (
	_ "github.com/smallstep/certificates/cmd/step-ca"
)
