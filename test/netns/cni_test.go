package netns_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"

	"github.com/meshproxy/meshproxy/ca/authn/authntest"
	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/internal/testpki"
	"github.com/meshproxy/meshproxy/nodeagent"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// TestSidecarsThroughNodeCapture is TestSidecarsThroughCapture with the
// capture installed by the CNI plugin (the built binary, started as
// meshproxy-cni the way a runtime starts the second plugin of a list)
// from the pods' annotations instead of `redirect install` in the pods:
// STRICT mesh mTLS on the wire, the server's peers show the client, a pod
// without a sidecar is refused; DEL leaves nothing behind.
func TestSidecarsThroughNodeCapture(t *testing.T) {
	eachMode(t, testNodeCapture)
}

func testNodeCapture(t *testing.T, mode redirect.Mode) {
	a, b := netns.NewPair(t)
	var cgA, cgB string
	if mode == redirect.ModeEBPF {
		cgA, cgB = netns.NewCgroup(t), netns.NewCgroup(t)
	}
	api := authntest.NewAPIServer(t)
	api.AddPod("default", "client", "uid-a", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureNode,
		podcapture.ModeAnnotation: string(mode), podcapture.ExcludeOutboundCIDRsAnnotation: "198.19.0.0/24,fd00:198:19::/64"})
	api.AddPod("default", "server", "uid-b", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureNode,
		podcapture.ModeAnnotation: string(mode), podcapture.ExcludeInboundPortsAnnotation: fmt.Sprint(excludedPort)})
	kubeconfig := api.WriteKubeconfig(t, t.TempDir(), false)
	pluginDir := t.TempDir()
	if err := os.Symlink(bin, filepath.Join(pluginDir, cni.PluginType)); err != nil {
		t.Fatal(err)
	}
	plugin := filepath.Join(pluginDir, cni.PluginType)
	stateDir := t.TempDir()

	call := func(command string, pod *netns.Pod, name, cgroup string) error {
		prev := map[string]any{"cniVersion": "1.0.0",
			"interfaces": []any{map[string]any{"name": pod.Veth, "sandbox": "/var/run/netns/" + pod.Name}},
			"ips":        []any{map[string]any{"address": pod.V4.String() + "/24", "interface": 0}}}
		conf := map[string]any{"cniVersion": "1.0.0", "name": "pair", "type": cni.PluginType,
			"kubeconfig": kubeconfig, "stateDir": stateDir, "prevResult": prev}
		if cgroup != "" {
			conf["runtimeConfig"] = map[string]any{"cgroupPath": cgroup}
		}
		stdin, err := json.Marshal(conf)
		if err != nil {
			return err
		}
		args := &invoke.Args{Command: command, ContainerID: "sandbox-" + pod.Name, NetNS: "/var/run/netns/" + pod.Name,
			IfName: pod.Veth, Path: pluginDir,
			PluginArgs: [][2]string{{"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", name}}}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if command == "ADD" {
			_, err = invoke.ExecPluginWithResult(ctx, plugin, stdin, args, nil)
			return err
		}
		return invoke.ExecPluginWithoutResult(ctx, plugin, stdin, args, nil)
	}
	pods := []struct {
		pod      *netns.Pod
		name, cg string
	}{{a, "client", cgA}, {b, "server", cgB}}
	for _, p := range pods {
		if err := call("ADD", p.pod, p.name, p.cg); err != nil {
			t.Fatalf("ADD %s: %v", p.name, err)
		}
		t.Cleanup(func() { _ = call("DEL", p.pod, p.name, p.cg) })
		if err := call("CHECK", p.pod, p.name, p.cg); err != nil {
			t.Fatalf("CHECK %s: %v", p.name, err)
		}
	}

	ca := testpki.New(t, "cluster.local")
	b.Serve(t, netns.Server{Name: "b", Echo: true, Addrs: []string{fmt.Sprintf(":%d", appPort)}})
	startSidecar(t, a, cgA, "STRICT", identityFiles(t, ca, clientID))
	startSidecar(t, b, cgB, "STRICT", identityFiles(t, ca, serverID))
	app := netns.As{UID: 1000, GID: 1000, Cgroup: cgA}
	noSidecar := netns.As{UID: proxyUser.UID, GID: proxyUser.GID, Cgroup: cgA}

	for _, dst := range []netip.Addr{netns.BV4, netns.BV6} {
		assertMeshed(t, a, b, dst, app)
		if line, err := a.Dial(t, hp(dst, appPort), noSidecar, netns.DialOpts{Send: "hello"}); err == nil && strings.HasPrefix(line, "app") {
			t.Errorf("STRICT served plaintext from a pod without sidecar: %q", line)
		}
	}

	// The agent leaving the node (--uninstall) does not touch running pods:
	// a held connection and new ones keep going through their capture.
	_, release := a.DialHold(t, hp(netns.BV4, appPort), app, netns.DialOpts{Send: "held"})
	agent := nodeagent.Config{BinDir: t.TempDir(), ConfDir: t.TempDir(), Binary: bin, Mode: mode,
		APIServer: api.URL, TokenFile: filepath.Join(filepath.Dir(kubeconfig), "reviewer-token"),
		CAFile: filepath.Join(filepath.Dir(kubeconfig), "ca.crt")}
	list := `{"cniVersion":"1.0.0","name":"pair","plugins":[{"type":"ptp"}]}`
	if err := os.WriteFile(filepath.Join(agent.ConfDir, "10-pair.conflist"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := nodeagent.Install(agent); err != nil {
		t.Fatalf("node agent install: %v", err)
	}
	if out, err := exec.Command(bin, "node-agent", "--uninstall", "--bin-dir", agent.BinDir, "--conf-dir", agent.ConfDir).CombinedOutput(); err != nil {
		t.Fatalf("node-agent --uninstall: %v\n%s", err, out)
	}
	assertMeshed(t, a, b, netns.BV6, app)
	release()

	for _, p := range pods {
		for i := range 2 {
			if err := call("DEL", p.pod, p.name, p.cg); err != nil {
				t.Fatalf("DEL %d of %s: %v", i+1, p.name, err)
			}
		}
		netns.AssertNoCapture(t, p.pod, redirect.Config{Mode: mode, CgroupPath: p.cg})
	}
}
