package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshproxy/meshproxy/ca"
)

func TestCARotateRootOnePhasePerRunAndStatus(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cacerts")
	if code, out := caExec(t, "ca", "init", "--dir", dir, "--trust-domain", "example.org"); code != 0 {
		t.Fatalf("init: %d %s", code, out)
	}
	steps := []struct {
		args []string
		code int
		want []string
	}{
		{[]string{"--phase", "retire"}, 2, []string{"cannot retire in phase idle", "next step is add"}},
		{nil, 0, []string{"added a new root", "Phase:", "added", "Staged:", "# switch"}},
		{[]string{"--phase", "add"}, 2, []string{"cannot add in phase added"}},
		{[]string{"--phase", "switch"}, 0, []string{"switched signing", "switched", "Outstanding:", "# retire"}},
		{nil, 1, []string{"no record", "--force retires anyway"}},
		{[]string{"--force"}, 0, []string{"retired the old root", "idle (last rotation completed"}},
	}
	for _, s := range steps {
		code, out := caExec(t, append([]string{"ca", "rotate-root", "--dir", dir}, s.args...)...)
		if code != s.code {
			t.Fatalf("rotate-root %v: exit %d, want %d: %s", s.args, code, s.code, out)
		}
		for _, w := range s.want {
			if !strings.Contains(out, w) {
				t.Fatalf("rotate-root %v: output lacks %q:\n%s", s.args, w, out)
			}
		}
	}
	code, out := caExec(t, "ca", "status", "--dir", dir, "-o", "json")
	if code != 0 {
		t.Fatalf("status: %d %s", code, out)
	}
	var st ca.RotationStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	if st.Phase != ca.PhaseIdle || st.NextStep != ca.StepAdd || len(st.Roots) != 1 || st.TrustDomain != "example.org" {
		t.Fatalf("status after a completed rotation: %+v", st)
	}
}

func TestCARotateUsageErrorsNameTheFlag(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"ca", "rotate-root"}, "--dir"},
		{[]string{"ca", "rotate-root", "--dir", dir, "--phase", "rollback"}, "--phase"},
		{[]string{"ca", "rotate-root", "--dir", dir, "--key-type", "dsa"}, "--key-type"},
		{[]string{"ca", "rotate-root", "--dir", dir, "--ca-ttl", "100h", "--root-ttl", "10h"}, "--ca-ttl"},
		{[]string{"ca", "status"}, "--dir"},
		{[]string{"ca", "status", "--dir", dir, "-o", "yaml"}, "--output"},
		{[]string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", "x", "--bundle-endpoint", "nope"}, "--bundle-endpoint"},
		{[]string{"ca", "serve", "--dir", dir, "--auth", "token", "--tokens", "x", "--bundle-endpoint", ":0", "--bundle-refresh-hint", "10ms"}, "--bundle-refresh-hint"},
	} {
		code, out := caExec(t, tc.args...)
		if code != 2 || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, want 2 naming %s: %s", tc.args, code, tc.want, out)
		}
	}
}
