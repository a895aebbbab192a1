package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/policy"
	"github.com/meshproxy/meshproxy/tlsmgr"
)

// TestSVIDPolicyIsNotReadyUntilTheNamespacesPolicyLoads: with the namespace
// taken from the SVID, the sidecar fails closed until the identity is
// loaded, and says it is not ready; once the identity is, the policy of its
// namespace is in effect (here a PERMISSIVE PeerAuthentication of ns "demo")
// and it is ready. A sidecar that was ready earlier would have served its
// first app connections with the fail-closed policy.
func TestSVIDPolicyIsNotReadyUntilTheNamespacesPolicyLoads(t *testing.T) {
	ca := testpki.New(t, "cluster.local")
	id := "spiffe://cluster.local/ns/demo/sa/web"
	src := tlsmgr.NewStatic(ca.IssueLeaf(t, testpki.Leaf{ID: id, NotBefore: time.Now().Add(-3 * time.Hour), TTL: time.Hour}), ca.Bundle())
	dir := t.TempDir()
	pa := "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: demo}\nspec: {mtls: {mode: PERMISSIVE}}\n"
	if err := os.WriteFile(filepath.Join(dir, "pa.yaml"), []byte(pa), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	pol, err := watchPolicyForSVID(ctx, src, dir, policy.Workload{Namespace: "default"}, "istio-system", policyOptions("istio-system", ca.TrustDomain, log), log)
	if err != nil {
		t.Fatal(err)
	}
	if err := pol.Ready(); err == nil || !strings.Contains(err.Error(), "not loaded yet") {
		t.Fatalf("Ready() before the identity = %v", err)
	}
	if m := pol.Current().InboundMode(8080); m != policy.ModeStrict {
		t.Fatalf("mode before the identity = %v, want STRICT (fail closed)", m)
	}

	src.Set(ca.Issue(t, id, time.Hour), ca.Bundle())
	deadline := time.Now().Add(10 * time.Second)
	for pol.Ready() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("not ready 10s after the identity: %v", pol.Ready())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if m := pol.Current().InboundMode(8080); m != policy.ModePermissive {
		t.Fatalf("mode once ready = %v, want PERMISSIVE from namespace demo's PeerAuthentication", m)
	}
}
