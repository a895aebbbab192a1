//go:build tools

// Package coredns pins the CoreDNS the test cluster runs as its cluster DNS.
// Nothing imports it; test/cluster/tools/build.sh builds it.
package coredns

import _ "github.com/coredns/coredns"
