package apphealth

import (
	"strings"
	"testing"
)

func TestParseAcceptsIstioStyleProbers(t *testing.T) {
	p, err := Parse([]byte(`{
		"/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "https", "httpHeaders": [{"name": "X-A", "value": "b"}]}, "timeoutSeconds": 3},
		"/app-health/web/livez": {"tcpSocket": {"port": 8080}},
		"/app-health/api-2/startupz": {"grpc": {"port": 9090, "service": "orders"}}
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if g := p["/app-health/web/readyz"]; g.HTTPGet.Scheme != SchemeHTTPS || g.TimeoutSeconds != 3 || g.HTTPGet.HTTPHeaders[0].Value != "b" {
		t.Errorf("readyz %+v %+v", g, g.HTTPGet)
	}
	if l := p["/app-health/web/livez"]; l.TimeoutSeconds != DefaultTimeoutSeconds || l.TCPSocket.Port != 8080 {
		t.Errorf("livez %+v: the kubelet's default timeout is 1s", l)
	}
	if s := p["/app-health/api-2/startupz"]; *s.GRPC.Service != "orders" {
		t.Errorf("startupz %+v", s)
	}
	for _, empty := range []string{"", "  \n", "{}"} {
		if p, err := Parse([]byte(empty)); err != nil || len(p) != 0 {
			t.Errorf("Parse(%q) = %v, %v: want no probes", empty, p, err)
		}
	}
}

func TestParseRefusesWhatCouldLeaveThePodOrMakesNoSense(t *testing.T) {
	for name, tc := range map[string]struct{ json, want string }{
		"not json":         {`{"/app-health/a/livez":`, "JSON"},
		"null":             {`null`, "null"},
		"trailing":         {`{} {}`, "trailing"},
		"host field":       {`{"/app-health/a/livez": {"httpGet": {"host": "10.0.0.1", "port": 80}}}`, `unknown field "host"`},
		"tcp host":         {`{"/app-health/a/livez": {"tcpSocket": {"host": "evil", "port": 80}}}`, `unknown field "host"`},
		"absolute url":     {`{"/app-health/a/livez": {"httpGet": {"path": "http://evil/x", "port": 80}}}`, "absolute path"},
		"scheme-relative":  {`{"/app-health/a/livez": {"httpGet": {"path": "//evil/x", "port": 80}}}`, "absolute path"},
		"relative path":    {`{"/app-health/a/livez": {"httpGet": {"path": "x", "port": 80}}}`, "absolute path"},
		"scheme":           {`{"/app-health/a/livez": {"httpGet": {"port": 80, "scheme": "ftp"}}}`, "HTTP or HTTPS"},
		"header name":      {`{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "a b", "value": "c"}]}}}`, "header name"},
		"header value":     {`{"/app-health/a/livez": {"httpGet": {"port": 80, "httpHeaders": [{"name": "A", "value": "x\r\nB: y"}]}}}`, "header value"},
		"port 0":           {`{"/app-health/a/livez": {"tcpSocket": {"port": 0}}}`, "1-65535"},
		"port big":         {`{"/app-health/a/livez": {"grpc": {"port": 70000}}}`, "1-65535"},
		"own port":         {`{"/app-health/a/livez": {"httpGet": {"port": 15021}}}`, "call itself"},
		"named port":       {`{"/app-health/a/livez": {"httpGet": {"port": "http"}}}`, "JSON"},
		"two handlers":     {`{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}`, "exactly one"},
		"no handler":       {`{"/app-health/a/livez": {"timeoutSeconds": 1}}`, "exactly one"},
		"exec":             {`{"/app-health/a/livez": {"exec": {"command": ["true"]}}}`, `unknown field "exec"`},
		"negative timeout": {`{"/app-health/a/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": -1}}`, "timeoutSeconds"},
		"bad prefix":       {`{"/healthz/a/livez": {"tcpSocket": {"port": 1}}}`, "/app-health/CONTAINER"},
		"bad kind":         {`{"/app-health/a/alive": {"tcpSocket": {"port": 1}}}`, "probe kind"},
		"bad container":    {`{"/app-health/A_b/livez": {"tcpSocket": {"port": 1}}}`, "container name"},
		"traversal":        {`{"/app-health/../livez": {"tcpSocket": {"port": 1}}}`, "container name"},
		"extra segment":    {`{"/app-health/a/b/livez": {"tcpSocket": {"port": 1}}}`, "probe kind"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tc.json))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

func TestProbersJSONRoundTrips(t *testing.T) {
	svc := "s"
	in := Probers{
		Path("a", Liveness):  {HTTPGet: &HTTPGet{Path: "/x", Port: 80, Scheme: SchemeHTTP}, TimeoutSeconds: 2},
		Path("a", Readiness): {GRPC: &GRPC{Port: 90, Service: &svc}, TimeoutSeconds: 1},
	}
	js, err := in.JSON()
	if err != nil {
		t.Fatal(err)
	}
	out, err := Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	again, _ := out.JSON()
	if again != js {
		t.Errorf("round trip changed the JSON:\n%s\n%s", js, again)
	}
}
