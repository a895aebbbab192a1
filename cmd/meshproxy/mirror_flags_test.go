package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigMirrorUsageErrorsNameTheFlag(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	if code, out := caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "cluster.local"); code != 0 {
		t.Fatalf("init: %d %s", code, out)
	}
	run := []string{"run", "--inbound-explicit", "127.0.0.1:0=127.0.0.1:1"}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", "x", "--mirror-istio-config", "--mirror-listen", "nope"}, "--mirror-listen"},
		{[]string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", "x", "--mirror-istio-config", "--root-namespace", ""}, "--root-namespace"},
		{[]string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", "x", "--kubeconfig", "k"}, "--mirror-istio-config"},
		{append(run, "--config-server", "ca:15011"), "--config-dir"},
		{append(run, "--config-server", "no-port", "--config-dir", t.TempDir()), "--config-server"},
		{append(run, "--config-server", "ca:15011", "--config-dir", t.TempDir(), "--config-server-id", "https://x"), "--config-server-id"},
		{append(run, "--config-server-id", "spiffe://cluster.local/ns/istio-system/sa/meshproxy-ca"), "--config-server"},
	} {
		code, out := caExec(t, tc.args...)
		if code != 2 || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, want 2 naming %s: %s", tc.args, code, tc.want, out)
		}
	}
}
