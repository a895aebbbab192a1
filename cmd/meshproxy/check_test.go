package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// checkExec runs `meshproxy check ARGS` in-process: exit status, standard
// output, and the error main would print.
func checkExec(t *testing.T, args ...string) (code int, stdout, errMsg string) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"check"}, args...))
	err := root.ExecuteContext(context.Background())
	var ue usageError
	switch {
	case err == nil:
		return 0, out.String(), ""
	case errors.As(err, &ue):
		return 2, out.String(), err.Error()
	}
	return 1, out.String(), err.Error()
}

func writeCheckFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckReportsEveryDocumentAndExitStatus(t *testing.T) {
	dir := t.TempDir()
	writeCheckFile(t, dir, "a.yaml", `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: get-only
spec:
  rules:
  - to:
    - operation:
        methods: [GET]
        ports: ["8080"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: shadow
  annotations:
    istio.io/dry-run: "true"
spec:
  action: DENY
  rules: [{}]
`)
	bad := writeCheckFile(t, t.TempDir(), "bad.yaml", `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad
  namespace: shop
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["10.0.0.0/40"]
`)
	code, out, _ := checkExec(t, "--config-dir", dir, "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, out)
	}
	var docs []checkDocument
	if err := json.Unmarshal([]byte(out), &docs); err != nil {
		t.Fatalf("json: %v\n%s", err, out)
	}
	want := []struct{ kind, ns, name, result, field string }{
		{"PeerAuthentication", "default", "default", "applied", ""},
		{"AuthorizationPolicy", "default", "get-only", "warned", "spec.rules[0].to[0].operation.methods"},
		{"AuthorizationPolicy", "default", "shadow", "dry-run", ""},
	}
	if len(docs) != len(want) {
		t.Fatalf("got %d documents: %s", len(docs), out)
	}
	for i, w := range want {
		d := docs[i]
		if d.Index != i+1 || d.Kind != w.kind || d.Namespace != w.ns || d.Name != w.name || d.Result != w.result ||
			!strings.HasSuffix(d.File, "a.yaml") || d.Messages == nil {
			t.Errorf("document %d = %+v, want %+v", i, d, w)
		}
		if w.field != "" && (len(d.Messages) == 0 || d.Messages[0].Field != w.field) {
			t.Errorf("document %d messages %+v, want field %s", i, d.Messages, w.field)
		}
	}

	code, out, msg := checkExec(t, "-f", filepath.Join(dir, "a.yaml"), "-f", bad)
	if code != 1 || !strings.Contains(out, "rejected  "+bad+": document 1 (AuthorizationPolicy shop/bad)") ||
		!strings.Contains(out, "spec.rules[0].from[0].source.ipBlocks[0]") || !strings.Contains(out, "1 rejected") {
		t.Errorf("exit %d (%s):\n%s", code, msg, out)
	}

	// The effective policy of one workload.
	labels := writeCheckFile(t, t.TempDir(), "labels", "app=\"web\"\n")
	code, out, _ = checkExec(t, "--config-dir", dir, "--namespace", "default", "--labels-file", labels)
	if code != 0 || !strings.Contains(out, "mTLS mode: STRICT") || !strings.Contains(out, `"policy":"default/get-only"`) ||
		!strings.Contains(out, `"never_matches":true`) {
		t.Errorf("effective policy, exit %d:\n%s", code, out)
	}

	for _, args := range [][]string{
		{},
		{"--config-dir", dir, "-f", bad},
		{"--config-dir", dir, "-o", "yaml"},
		{"--config-dir", dir, "--for", "waypoint"},
		{"-f", filepath.Join(dir, "missing.yaml")},
	} {
		if code, out, msg := checkExec(t, args...); code != 2 {
			t.Errorf("check %v: exit %d, want 2 (%s %s)", args, code, msg, out)
		}
	}
}
