package cni_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshproxy/meshproxy/ca/authn/authntest"
	"github.com/meshproxy/meshproxy/cni"
	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/redirect"
	"github.com/meshproxy/meshproxy/test/netns"
)

// The test binary doubles as the plugin, started by libcni as meshproxy-cni.
func TestMain(m *testing.M) {
	netns.RunHelper()
	if filepath.Base(os.Args[0]) == cni.PluginType {
		if err := cni.Main("meshproxy test plugin"); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// referencePlugins is where Debian's containernetworking-plugins installs
// the reference plugins (bridge, host-local).
const referencePlugins = "/usr/lib/cni"

// node is a CNI runtime's view of one test node: the plugin directories, a
// chained list with bridge first and meshproxy-cni second, and libcni.
type node struct {
	cni      *libcni.CNIConfig
	list     *libcni.NetworkConfigList
	stateDir string
	bridge   string
}

func newNode(t *testing.T, api *authntest.APIServer, extra map[string]any) *node {
	t.Helper()
	netns.RequireRoot(t)
	for _, p := range []string{"bridge", "host-local"} {
		if _, err := os.Stat(filepath.Join(referencePlugins, p)); err != nil {
			t.Skipf("reference plugin %s not installed (apt-get install containernetworking-plugins): %v", p, err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	if err := os.Symlink(self, filepath.Join(bin, cni.PluginType)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	_, _ = rand.Read(b)
	n := &node{stateDir: filepath.Join(t.TempDir(), "state"), bridge: "mpbr" + hex.EncodeToString(b)}
	t.Cleanup(func() { _ = exec.Command("ip", "link", "del", n.bridge).Run() })
	entry := map[string]any{"type": cni.PluginType, "kubeconfig": api.WriteKubeconfig(t, t.TempDir(), false), "stateDir": n.stateDir,
		"capabilities": map[string]any{"cgroupPath": true}}
	for k, v := range extra {
		entry[k] = v
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "mp-test",
		"plugins": []any{
			map[string]any{"type": "bridge", "bridge": n.bridge, "isGateway": true, "isDefaultGateway": true,
				"ipam": map[string]any{"type": "host-local", "dataDir": t.TempDir(),
					"ranges": []any{[]any{map[string]any{"subnet": fmt.Sprintf("10.250.%d.0/24", b[0])}}}}},
			entry,
		},
	}
	raw, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	if n.list, err = libcni.ConfListFromBytes(raw); err != nil {
		t.Fatal(err)
	}
	n.cni = libcni.NewCNIConfigWithCacheDir([]string{bin, referencePlugins}, t.TempDir(), nil)
	return n
}

// sandbox is one pod sandbox: an empty network namespace, as a runtime
// creates it before calling ADD.
func sandbox(t *testing.T, ns, name, uid string, cgroup string) (*netns.Pod, *libcni.RuntimeConf) {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	p := &netns.Pod{Name: "mpcni" + hex.EncodeToString(b)}
	netns.Run(t, "ip", "netns", "add", p.Name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", p.Name).Run() })
	netns.Run(t, "ip", "-n", p.Name, "link", "set", "lo", "up")
	rt := &libcni.RuntimeConf{
		ContainerID: "sandbox" + hex.EncodeToString(b),
		NetNS:       "/var/run/netns/" + p.Name,
		IfName:      "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", ns}, {"K8S_POD_NAME", name},
			{"K8S_POD_INFRA_CONTAINER_ID", "sandbox"}, {"K8S_POD_UID", uid}},
	}
	if cgroup != "" {
		rt.CapabilityArgs = map[string]any{"cgroupPath": cgroup}
	}
	return p, rt
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}

var (
	app   = netns.As{UID: 1000, GID: 1000}
	proxy = netns.As{UID: redirect.DefaultProxyUID, GID: redirect.DefaultProxyGID}
)

// sentinelAnswer is what the proxy stand-in on 15001 answers a captured
// connection to the sentinel with.
var sentinelAnswer = "proxy out origdst=" + podcapture.Sentinel.String()

// TestChainedAddCheckDel drives bridge + meshproxy-cni through libcni as a
// runtime does, for every capture mode: ADD passes the bridge's result on
// and leaves working capture in the pod's namespace, CHECK passes, DEL
// leaves nothing behind and may be repeated.
func TestChainedAddCheckDel(t *testing.T) {
	for _, mode := range redirect.Modes {
		t.Run(string(mode), func(t *testing.T) {
			if mode == redirect.ModeIptables {
				if _, err := exec.LookPath("iptables-restore"); err != nil {
					t.Skip("iptables-restore not installed")
				}
			}
			api := authntest.NewAPIServer(t)
			n := newNode(t, api, nil)
			var cg string
			if mode == redirect.ModeEBPF {
				if _, err := netns.Cgroup2Mount(); err != nil {
					t.Skipf("no cgroup v2 hierarchy: %v", err)
				}
				cg = netns.NewCgroup(t)
			}
			api.AddPod("shop", "web-1", "2f0c7d0e-1111-4222-8333-944445555666", map[string]string{
				podcapture.CaptureAnnotation: podcapture.CaptureNode, podcapture.ModeAnnotation: string(mode),
				podcapture.ExcludeInboundPortsAnnotation: "8443"})
			pod, rt := sandbox(t, "shop", "web-1", "2f0c7d0e-1111-4222-8333-944445555666", cg)
			appAs, proxyAs := app, proxy
			appAs.Cgroup, proxyAs.Cgroup = cg, cg

			res, err := n.cni.AddNetworkList(ctx(t), n.list, rt)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			assertBridgeResult(t, pod, res)

			// Capture really works: a connection to the never-routed
			// sentinel reaches the proxy's outbound port.
			pod.Serve(t, netns.Server{Name: "out", Proxy: true, Addrs: []string{":15001"}, As: proxyAs})
			if got, err := pod.Dial(t, podcapture.Sentinel.String(), appAs); err != nil || got != sentinelAnswer {
				t.Fatalf("dial the sentinel from the pod: %q, %v; want %q", got, err, sentinelAnswer)
			}
			st := status(t, pod, mode, cg)
			if !st.Installed() {
				t.Fatalf("capture after ADD is not complete:\n%s", st)
			}
			if err := n.cni.CheckNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("CHECK after ADD: %v", err)
			}

			if err := n.cni.DelNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			netns.AssertNoCapture(t, pod, redirect.Config{Mode: mode, CgroupPath: cg})
			if err := n.cni.DelNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("second DEL: %v", err)
			}
		})
	}
}

// assertBridgeResult checks that the list's result is the bridge plugin's,
// describing the interface it really configured in the pod.
func assertBridgeResult(t *testing.T, pod *netns.Pod, res types.Result) {
	t.Helper()
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatalf("result: %v", err)
	}
	if len(r.IPs) != 1 || len(r.Interfaces) != 3 {
		t.Fatalf("result is not the bridge's (1 IP, bridge + veth + eth0): %+v", r)
	}
	out := netns.Run(t, "ip", "-n", pod.Name, "-o", "addr", "show", "dev", "eth0")
	if !strings.Contains(out, " "+r.IPs[0].Address.String()+" ") {
		t.Fatalf("result's address %s is not on the pod's eth0:\n%s", r.IPs[0].Address.String(), out)
	}
	sb := r.Interfaces[*r.IPs[0].Interface]
	if sb.Name != "eth0" || sb.Sandbox == "" {
		t.Fatalf("result's IP is not on the sandbox's eth0: %+v", sb)
	}
}

func status(t *testing.T, pod *netns.Pod, mode redirect.Mode, cg string) *redirect.State {
	t.Helper()
	var st *redirect.State
	if err := pod.Do(func() (err error) {
		st, err = redirect.Status(context.Background(), redirect.Config{Mode: mode, CgroupPath: cg})
		return err
	}); err != nil {
		t.Fatalf("status: %v", err)
	}
	return st
}

// TestPrevResultPassedOnUnchanged runs the plugin alone with a prevResult,
// as the runtime does for the second plugin of a list: what it prints is
// that prevResult, for an injected pod and for one left alone.
func TestPrevResultPassedOnUnchanged(t *testing.T) {
	api := authntest.NewAPIServer(t)
	n := newNode(t, api, nil)
	api.AddPod("shop", "web-2", "u2", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureNode})
	api.AddPod("shop", "plain", "u3", nil)
	for _, name := range []string{"web-2", "plain"} {
		t.Run(name, func(t *testing.T) {
			_, rt := sandbox(t, "shop", name, "", "")
			first := &libcni.NetworkConfigList{CNIVersion: n.list.CNIVersion, Name: n.list.Name, Plugins: n.list.Plugins[:1]}
			res, err := n.cni.AddNetworkList(ctx(t), first, rt)
			if err != nil {
				t.Fatalf("bridge ADD: %v", err)
			}
			t.Cleanup(func() { _ = n.cni.DelNetworkList(context.Background(), first, rt) })
			prev, err := json.Marshal(res)
			if err != nil {
				t.Fatal(err)
			}
			var conf map[string]any
			if err := json.Unmarshal(n.list.Plugins[1].Bytes, &conf); err != nil {
				t.Fatal(err)
			}
			conf["cniVersion"], conf["name"] = n.list.CNIVersion, n.list.Name
			conf["prevResult"] = json.RawMessage(prev)
			stdin, err := json.Marshal(conf)
			if err != nil {
				t.Fatal(err)
			}
			args := &invoke.Args{Command: "ADD", ContainerID: rt.ContainerID, NetNS: rt.NetNS, IfName: rt.IfName,
				PluginArgs: rt.Args, Path: strings.Join([]string{filepath.Dir(pluginPath(t, n)), referencePlugins}, ":")}
			out, err := invoke.ExecPluginWithResult(ctx(t), pluginPath(t, n), stdin, args, nil)
			if err != nil {
				t.Fatalf("plugin ADD: %v", err)
			}
			got, _ := json.Marshal(out)
			if string(got) != string(prev) {
				t.Fatalf("plugin changed the previous result:\n got %s\nwant %s", got, prev)
			}
			delArgs := *args
			delArgs.Command = "DEL"
			if err := invoke.ExecPluginWithoutResult(ctx(t), pluginPath(t, n), stdin, &delArgs, nil); err != nil {
				t.Fatalf("plugin DEL: %v", err)
			}
		})
	}
}

func pluginPath(t *testing.T, n *node) string {
	t.Helper()
	p, err := invoke.FindInPath(cni.PluginType, n.cni.Path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPodWithoutAnnotationUntouched: ADD and DEL of a pod that does not ask
// for node capture (or is in an excluded namespace, never asked about)
// leave its namespace without any capture.
func TestPodWithoutAnnotationUntouched(t *testing.T) {
	api := authntest.NewAPIServer(t)
	n := newNode(t, api, nil)
	api.AddPod("shop", "plain", "u1", map[string]string{"unrelated": "x"})
	api.AddPod("shop", "init-captured", "u4", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureInit})
	for _, c := range []struct{ ns, name string }{{"shop", "plain"}, {"shop", "init-captured"}, {"kube-system", "coredns"}} {
		t.Run(c.ns+"/"+c.name, func(t *testing.T) {
			pod, rt := sandbox(t, c.ns, c.name, "", "")
			res, err := n.cni.AddNetworkList(ctx(t), n.list, rt)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			assertBridgeResult(t, pod, res)
			netns.AssertNoCapture(t, pod, redirect.Config{}) // every mechanism, without a cgroup
			if err := n.cni.CheckNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("CHECK: %v", err)
			}
			if err := n.cni.DelNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("DEL: %v", err)
			}
		})
	}
}

// TestInjectedPodFailureFailsAdd: when an injected pod cannot get its
// capture, ADD fails with a message naming the pod and the cause, and
// nothing of the capture is left in its namespace.
func TestInjectedPodFailureFailsAdd(t *testing.T) {
	api := authntest.NewAPIServer(t)
	n := newNode(t, api, map[string]any{"cgroupRoot": t.TempDir()})
	node := podcapture.CaptureAnnotation
	api.AddPod("shop", "bad-mode", "u1", map[string]string{node: podcapture.CaptureNode, podcapture.ModeAnnotation: "ipvs"})
	api.AddPod("shop", "bad-cidr", "u2", map[string]string{node: podcapture.CaptureNode, podcapture.ExcludeOutboundCIDRsAnnotation: "10.0.0.0/33"})
	api.AddPod("shop", "no-cgroup", "3b6e1a70-0000-4000-8000-000000000001", map[string]string{node: podcapture.CaptureNode, podcapture.ModeAnnotation: "ebpf"})
	for _, c := range []struct{ name, want string }{
		{"bad-mode", `pod shop/bad-mode: invalid capture annotation: sidecar.meshproxy.io/capture-mode: "ipvs"`},
		{"bad-cidr", `pod shop/bad-cidr: invalid capture annotation: sidecar.meshproxy.io/exclude-outbound-cidrs`},
		{"no-cgroup", "no cgroup of pod UID 3b6e1a70-0000-4000-8000-000000000001"},
		{"not-in-api", "pod shop/not-in-api: cannot tell whether it needs capture"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pod, rt := sandbox(t, "shop", c.name, "", "")
			_, err := n.cni.AddNetworkList(ctx(t), n.list, rt)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("ADD: %v; want an error containing %q", err, c.want)
			}
			netns.AssertNoCapture(t, pod, redirect.Config{}) // every mechanism, without a cgroup
			_ = n.cni.DelNetworkList(ctx(t), n.list, rt)     // the runtime cleans up the bridge's part
		})
	}
	t.Run("api-server-down", func(t *testing.T) {
		api.AddPod("shop", "web", "u5", map[string]string{node: podcapture.CaptureNode})
		api.Close()
		_, rt := sandbox(t, "shop", "web", "", "")
		_, err := n.cni.AddNetworkList(ctx(t), n.list, rt)
		if err == nil || !strings.Contains(err.Error(), "cannot tell whether it needs capture") {
			t.Fatalf("ADD with the API server down: %v; want it to fail closed", err)
		}
		_ = n.cni.DelNetworkList(ctx(t), n.list, rt)
	})
}

// TestDelWithoutNetns: the runtime may call DEL after the namespace is
// gone; DEL succeeds, removes the node-side eBPF pins, and may be repeated.
func TestDelWithoutNetns(t *testing.T) {
	if _, err := netns.Cgroup2Mount(); err != nil {
		t.Skipf("no cgroup v2 hierarchy: %v", err)
	}
	api := authntest.NewAPIServer(t)
	n := newNode(t, api, nil)
	cg := netns.NewCgroup(t)
	api.AddPod("shop", "gone", "u1", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureNode, podcapture.ModeAnnotation: "ebpf"})
	pod, rt := sandbox(t, "shop", "gone", "", cg)
	if _, err := n.cni.AddNetworkList(ctx(t), n.list, rt); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	pins := redirect.PinDir(redirect.Config{Mode: redirect.ModeEBPF, CgroupPath: cg})
	if _, err := os.Stat(pins); err != nil {
		t.Fatalf("no eBPF pins after ADD: %v", err)
	}
	netns.Run(t, "ip", "netns", "del", pod.Name)
	for i := range 2 {
		if err := n.cni.DelNetworkList(ctx(t), n.list, rt); err != nil {
			t.Fatalf("DEL %d without the namespace: %v", i+1, err)
		}
	}
	if _, err := os.Stat(pins); !os.IsNotExist(err) {
		t.Fatalf("eBPF pins left after DEL: %v", err)
	}
}

// TestValidationSeesCapture runs the validation init container's check in
// pods after ADD: it passes where the node installed capture and fails,
// saying why, where it did not.
func TestValidationSeesCapture(t *testing.T) {
	api := authntest.NewAPIServer(t)
	n := newNode(t, api, nil)
	api.AddPod("shop", "web-v", "u1", map[string]string{podcapture.CaptureAnnotation: podcapture.CaptureNode})
	api.AddPod("shop", "plain-v", "u2", nil)
	for _, c := range []struct {
		name string
		ok   bool
	}{{"web-v", true}, {"plain-v", false}} {
		t.Run(c.name, func(t *testing.T) {
			pod, rt := sandbox(t, "shop", c.name, "", "")
			if _, err := n.cni.AddNetworkList(ctx(t), n.list, rt); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			t.Cleanup(func() { _ = n.cni.DelNetworkList(context.Background(), n.list, rt) })
			err := pod.Do(func() error {
				return redirect.VerifyOutbound(context.Background(), redirect.DefaultOutboundPort, podcapture.Sentinel, 2, time.Second)
			})
			if (err == nil) != c.ok {
				t.Fatalf("validation: %v; want success %v", err, c.ok)
			}
			if !c.ok && !errors.Is(err, redirect.ErrNotCaptured) {
				t.Fatalf("validation failure does not say capture is missing: %v", err)
			}
		})
	}
}
