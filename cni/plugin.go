package cni

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshproxy/meshproxy/internal/podcapture"
	"github.com/meshproxy/meshproxy/redirect"
)

// callTimeout bounds one CNI call: the runtime waits for the sandbox.
const callTimeout = 60 * time.Second

// Plugin answers CNI calls. The zero value reads pods from the API server
// of the configuration's kubeconfig and logs to stderr.
type Plugin struct {
	// Pods returns the source pods are read from for a configuration; nil
	// means NewAPIPods(conf.Kubeconfig).
	Pods func(conf *Conf) (PodSource, error)
	// Log receives one line per decision; nil means stderr (the runtime
	// keeps a plugin's stderr in its own log).
	Log *slog.Logger
}

// Main runs the plugin as the CNI spec says: the command from CNI_COMMAND
// and the environment, the configuration on stdin, the result or error on
// stdout. It returns the error it printed, so the caller can exit non-zero.
func Main(about string) error {
	p := &Plugin{}
	if err := skel.PluginMainFuncsWithError(skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check}, Supported, about); err != nil {
		if perr := err.Print(); perr != nil {
			return errors.Join(err, perr)
		}
		return err
	}
	return nil
}

func (p *Plugin) log() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", PluginType)
}

// begin parses a call's configuration and bounds the call; chained calls
// (ADD, CHECK) need the previous plugin's result.
func begin(args *skel.CmdArgs, chained bool) (context.Context, context.CancelFunc, *Conf, error) {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return nil, nil, nil, err
	}
	if chained && conf.PrevResult == nil {
		return nil, nil, nil, errFirst
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	return ctx, cancel, conf, nil
}

// decision is what the pod asks for.
type decision struct {
	ref     podRef
	wanted  bool
	capture redirect.Config
}

// decide reads the pod of a call and says whether it asks for node capture.
func (p *Plugin) decide(ctx context.Context, conf *Conf, cniArgs string) (decision, error) {
	ref, isPod, err := parseArgs(cniArgs)
	if err != nil {
		return decision{}, err
	}
	if !isPod || slices.Contains(conf.ExcludeNamespaces, ref.Namespace) {
		return decision{ref: ref}, nil
	}
	newPods := p.Pods
	if newPods == nil {
		newPods = func(c *Conf) (PodSource, error) { return NewAPIPods(c.Kubeconfig) }
	}
	pods, err := newPods(conf)
	if err != nil {
		return decision{}, fmt.Errorf("pod %s: cannot tell whether it needs capture: API server: %w", ref, err)
	}
	pod, err := pods.Pod(ctx, ref.Namespace, ref.Name)
	if err != nil {
		return decision{}, fmt.Errorf("pod %s: cannot tell whether it needs capture: %w", ref, err)
	}
	if ref.UID != "" && pod.UID != "" && ref.UID != pod.UID {
		return decision{}, fmt.Errorf("pod %s: the API server has UID %s, the runtime %s (pod replaced?)", ref, pod.UID, ref.UID)
	}
	ref.UID = pod.UID
	capture, wanted, err := podcapture.FromAnnotations(pod.Annotations, conf.Mode)
	if err != nil {
		return decision{}, fmt.Errorf("pod %s: %w", ref, err)
	}
	if wanted && conf.BPFFS != "" {
		capture.BPFFS = conf.BPFFS
	}
	return decision{ref: ref, wanted: wanted, capture: capture}, nil
}

// Add installs the capture of an injected pod in its network namespace and
// passes the previous result on unchanged.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	ctx, cancel, conf, err := begin(args, true)
	if err != nil {
		return err
	}
	defer cancel()
	d, err := p.decide(ctx, conf, args.Args)
	if err != nil {
		p.log().Error("add refused", "container", args.ContainerID, "err", err)
		return fmt.Errorf("meshproxy: %w", err)
	}
	if !d.wanted {
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	}
	fail := func(err error) error {
		err = fmt.Errorf("meshproxy: pod %s asks for node capture (%s: %s) but it could not be installed: %w",
			d.ref, podcapture.CaptureAnnotation, podcapture.CaptureNode, err)
		p.log().Error("add failed", "pod", d.ref.String(), "container", args.ContainerID, "mode", d.capture.Mode, "err", err)
		return err
	}
	if d.capture.Mode == redirect.ModeEBPF {
		if d.capture.CgroupPath, err = podCgroup(conf.CgroupRoot, conf.RuntimeConfig.CgroupPath, d.ref.UID); err != nil {
			return fail(err)
		}
	}
	rec := record{ContainerID: args.ContainerID, Pod: d.ref.String(), Netns: args.Netns, Capture: d.capture}
	if _, err := recordPath(conf.StateDir, args.ContainerID); err != nil {
		return fail(err)
	}
	if err := inNetns(args.Netns, func() error { return redirect.Install(ctx, d.capture) }); err != nil {
		return fail(err)
	}
	if err := saveRecord(conf.StateDir, rec); err != nil {
		undo := inNetns(args.Netns, func() error { return redirect.Uninstall(ctx, d.capture) })
		return fail(errors.Join(err, undo))
	}
	p.log().Info("capture installed", "pod", d.ref.String(), "container", args.ContainerID, "mode", d.capture.Mode)
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

// Del removes what Add installed. It is idempotent, needs no API server, and
// a network namespace that is already gone is not an error.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	ctx, cancel, conf, err := begin(args, false)
	if err != nil {
		return err
	}
	defer cancel()
	rec, ok, err := loadRecord(conf.StateDir, args.ContainerID)
	if err != nil || !ok {
		return err
	}
	err = inNetns(args.Netns, func() error { return redirect.Uninstall(ctx, rec.Capture) })
	if errors.Is(err, errNoNetns) {
		err = redirect.ReleaseCgroup(rec.Capture) // the rules died with the namespace; pins live on the node
	}
	if err != nil {
		p.log().Error("del failed", "pod", rec.Pod, "container", args.ContainerID, "err", err)
		return fmt.Errorf("meshproxy: pod %s: remove capture: %w", rec.Pod, err)
	}
	p.log().Info("capture removed", "pod", rec.Pod, "container", args.ContainerID)
	return removeRecord(conf.StateDir, args.ContainerID)
}

// Check verifies that the capture Add installed is still complete, and that
// a pod asking for capture got it.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	ctx, cancel, conf, err := begin(args, true)
	if err != nil {
		return err
	}
	defer cancel()
	rec, ok, err := loadRecord(conf.StateDir, args.ContainerID)
	if err != nil {
		return err
	}
	if !ok {
		d, err := p.decide(ctx, conf, args.Args)
		if err != nil {
			return fmt.Errorf("meshproxy: %w", err)
		}
		if d.wanted {
			return fmt.Errorf("meshproxy: pod %s asks for node capture but none was installed for container %s", d.ref, args.ContainerID)
		}
		return nil
	}
	var st *redirect.State
	if err := inNetns(args.Netns, func() (err error) {
		st, err = redirect.Status(ctx, rec.Capture)
		return err
	}); err != nil {
		return fmt.Errorf("meshproxy: pod %s: %w", rec.Pod, err)
	}
	if !st.Installed() {
		return fmt.Errorf("meshproxy: pod %s: capture is not complete:\n%s", rec.Pod, st)
	}
	return nil
}
