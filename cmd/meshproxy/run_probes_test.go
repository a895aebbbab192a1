package main

import (
	"strings"
	"testing"
)

func TestRunRefusesBadAppProbersAtStart(t *testing.T) {
	base := []string{"run", "--cert-file", "c.pem", "--key-file", "k.pem", "--bundle-file", "b.pem", "--inbound", ":0"}
	for name, tc := range map[string]struct {
		flag, env string
		want      []string
	}{
		"flag not json": {flag: `{"/app-health/app/readyz":`, want: []string{"--app-probers", "JSON"}},
		"flag bad port": {flag: `{"/app-health/app/readyz":{"tcpSocket":{"port":0}}}`, want: []string{"--app-probers", "/app-health/app/readyz", "tcpSocket.port 0"}},
		"env host":      {env: `{"/app-health/app/livez":{"httpGet":{"host":"10.0.0.1","port":80}}}`, want: []string{"MESHPROXY_APP_PROBERS", `unknown field "host"`}},
	} {
		t.Run(name, func(t *testing.T) {
			args := base
			if tc.flag != "" {
				args = append(append([]string{}, base...), "--app-probers", tc.flag)
			}
			if tc.env != "" {
				t.Setenv("MESHPROXY_APP_PROBERS", tc.env)
			}
			code, out := caExec(t, args...)
			if code != 2 {
				t.Fatalf("exit %d, want 2 (usage); output: %s", code, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output %q does not say %q", out, w)
				}
			}
		})
	}
}
