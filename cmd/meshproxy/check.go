package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshproxy/meshproxy/gateway"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/policy"
)

type checkFlags struct {
	configDir, forRole, namespace, labelsFile, output, rootNamespace, trustDomain string
	files                                                                         []string
}

// checkDocument is one line of `meshproxy check`'s report.
type checkDocument struct {
	File      string           `json:"file"`
	Index     int              `json:"index"`
	Kind      string           `json:"kind"`
	Namespace string           `json:"namespace"`
	Name      string           `json:"name"`
	Result    string           `json:"result"`
	Messages  []policy.Message `json:"messages"`
}

// errRejected makes check exit 1 once its report is printed.
var errRejected = errors.New("documents rejected")

func newCheckCmd() *cobra.Command {
	f := &checkFlags{}
	cmd := &cobra.Command{
		Use:   "check [--config-dir DIR | -f FILE ...]",
		Short: "Validate Istio YAML as run or gateway would load it",
		Long: `check loads Istio documents with exactly the code that meshproxy run (or, with
--for gateway, meshproxy gateway) uses for --config-dir, and prints for each
document one of:

  applied    honoured as written
  warned     applied; each field ignored or narrowed to L4 is named with why
  dry-run    an istio.io/dry-run AuthorizationPolicy: evaluated and counted, never enforced
  rejected   not applied (the reason names the field); it fails closed for what it selects

With --namespace or --labels-file it also prints the effective policy of that
workload: the mTLS mode per port and the authorization policies in force.

With --for gateway, Kubernetes Services among the files (kind: Service, as
kubectl apply takes them) are not listed but give their port to a
VirtualService destination that omits it, when the Service has exactly one.

Exit status: 0 when nothing is rejected, 1 when a document is rejected, 2 on
a usage error.`,
		Example: `  meshproxy check --config-dir ./policy
  meshproxy check -f peer-authentication.yaml -f authz.yaml --namespace shop --labels-file labels
  meshproxy check --config-dir ./gateway-config --for gateway -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runCheck(cmd.OutOrStdout(), cmd.InOrStdin(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.configDir, "config-dir", "", "directory of Istio YAML, read as run/gateway read --config-dir")
	fl.StringArrayVarP(&f.files, "filename", "f", nil, "a file of Istio YAML (repeatable; - for stdin)")
	fl.StringVar(&f.forRole, "for", "sidecar", "load as: sidecar (meshproxy run) or gateway (meshproxy gateway)")
	fl.StringVar(&f.namespace, "namespace", "", "the workload's namespace: the default for documents without one, and the workload whose effective policy to print")
	fl.StringVar(&f.labelsFile, "labels-file", "", "the workload's labels (downward API format), to print its effective policy")
	fl.StringVarP(&f.output, "output", "o", "text", "text or json")
	fl.StringVar(&f.rootNamespace, "root-namespace", "istio-system", "namespace whose policies apply mesh-wide")
	fl.StringVar(&f.trustDomain, "trust-domain", "", "trust domain of the mesh (default cluster.local)")
	return cmd
}

func runCheck(out io.Writer, stdin io.Reader, f *checkFlags) error {
	if (f.configDir == "") == (len(f.files) == 0) {
		return usagef("give either --config-dir DIR or -f FILE")
	}
	if f.output != "text" && f.output != "json" {
		return usagef("--output must be text or json, not %q", f.output)
	}
	if f.forRole != "sidecar" && f.forRole != "gateway" {
		return usagef("--for must be sidecar or gateway, not %q", f.forRole)
	}
	td, err := parseTrustDomain(f.trustDomain)
	if err != nil {
		return err
	}
	ns := f.namespace
	if ns == "" {
		ns = "default"
	}
	wl, err := workload(ns, f.labelsFile)
	if err != nil {
		return usagef("%v", err)
	}
	files, err := checkFiles(f, stdin)
	if err != nil {
		return err
	}
	quiet := slog.New(slog.DiscardHandler)
	opts := policyOptions(f.rootNamespace, td, quiet)
	cfg := policy.Load(files, wl, opts...)
	report := checkReport(cfg, f.forRole)
	if f.forRole == "gateway" {
		report = append(report, gatewayReport(files, ns, quiet)...)
		sortReport(report)
	}
	if f.output == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(report); err != nil {
			return fmt.Errorf("write report: %w", err)
		}
	} else {
		printCheckText(out, report)
		if f.namespace != "" || f.labelsFile != "" {
			printEffective(out, policy.NewSnapshot(cfg, wl, opts...))
		}
	}
	for _, d := range report {
		if d.Result == string(policy.ResultRejected) {
			return errRejected
		}
	}
	return nil
}

// checkFiles reads --config-dir as run does, or the -f files (bounded as
// a directory's files are).
func checkFiles(f *checkFlags, stdin io.Reader) ([]policy.File, error) {
	if f.configDir != "" {
		files, err := policy.ReadDir(f.configDir)
		if err != nil {
			return nil, fmt.Errorf("--config-dir: %w", err)
		}
		return files, nil
	}
	var files []policy.File
	for _, name := range f.files {
		var data []byte
		var err error
		if name == "-" {
			if data, err = io.ReadAll(io.LimitReader(stdin, fileread.MaxManifest+1)); err == nil && len(data) > fileread.MaxManifest {
				err = fmt.Errorf("more than the %d bytes allowed", fileread.MaxManifest)
			}
		} else if _, serr := os.Stat(name); serr != nil {
			return nil, usagef("-f: %v", serr)
		} else {
			data, err = fileread.Read(name, fileread.MaxManifest)
		}
		if err != nil {
			return nil, fmt.Errorf("-f %s: %w", name, err)
		}
		files = append(files, policy.File{Name: name, Data: data})
	}
	return files, nil
}

// checkReport lists every document in file order: the policy loader's
// results, and a warning for each Istio object the role does not read.
func checkReport(cfg *policy.Config, role string) []checkDocument {
	var out []checkDocument
	for _, d := range cfg.Documents {
		out = append(out, checkDocument{d.File, d.Index, d.Kind, d.Namespace, d.Name, string(d.Result), d.Messages})
	}
	for _, d := range cfg.Ignored {
		if !istioKind(d.Kind) || role == "gateway" && (d.Kind == "Gateway" || d.Kind == "VirtualService") {
			continue
		}
		msg := fmt.Sprintf("%s is not read by meshproxy run (meshproxy gateway reads Gateway and VirtualService); ignored", d.Kind)
		if role == "gateway" {
			msg = fmt.Sprintf("%s is not read by meshproxy gateway; ignored", d.Kind)
		}
		out = append(out, checkDocument{d.File, d.Index, d.Kind, d.Namespace, d.Name, string(policy.ResultWarned), []policy.Message{{Message: msg}}})
	}
	sortReport(out)
	return out
}

// sortReport orders the report by file and document, and gives every
// document a (possibly empty) list of messages.
func sortReport(out []checkDocument) {
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].File != out[j].File {
			return out[i].File < out[j].File
		}
		return out[i].Index < out[j].Index
	})
	for i := range out {
		if out[i].Messages == nil {
			out[i].Messages = []policy.Message{}
		}
	}
}

// gatewayReport is the gateway loader's verdict on each Gateway and
// VirtualService document.
func gatewayReport(files []policy.File, namespace string, log *slog.Logger) []checkDocument {
	mfiles := make([]manifest.File, len(files))
	for i, f := range files {
		mfiles[i] = manifest.File(f)
	}
	var out []checkDocument
	for _, r := range gateway.Check(mfiles, namespace, log) {
		d := checkDocument{File: r.File, Index: r.Index, Kind: r.Kind, Namespace: r.Namespace, Name: r.Name, Result: string(policy.ResultApplied)}
		for _, w := range r.Warnings {
			d.Messages = append(d.Messages, policy.Message{Field: w.Field, Message: w.Message})
			d.Result = string(policy.ResultWarned)
		}
		for _, e := range r.Errs {
			field, msg, ok := strings.Cut(e, ": ")
			if !ok || strings.Contains(field, " ") {
				field, msg = "", e
			}
			d.Messages = append(d.Messages, policy.Message{Field: field, Message: msg})
			d.Result = string(policy.ResultRejected)
		}
		out = append(out, d)
	}
	return out
}

// istioKind reports whether kind is one of Istio's configuration kinds
// that a user could expect meshproxy to read.
func istioKind(kind string) bool {
	switch kind {
	case "Gateway", "VirtualService", "ServiceEntry", "Sidecar", "WorkloadEntry", "WorkloadGroup", "EnvoyFilter",
		"RequestAuthentication", "Telemetry", "ProxyConfig", "WasmPlugin":
		return true
	}
	return false
}

func printCheckText(out io.Writer, report []checkDocument) {
	counts := map[string]int{}
	for _, d := range report {
		counts[d.Result]++
		id := d.Name
		if d.Namespace != "" && d.Name != "" {
			id = d.Namespace + "/" + d.Name
		}
		fmt.Fprintf(out, "%-8s  %s: document %d", d.Result, d.File, d.Index)
		if d.Kind != "" {
			fmt.Fprintf(out, " (%s %s)", d.Kind, id)
		}
		fmt.Fprintln(out)
		for _, m := range d.Messages {
			if m.Field != "" {
				fmt.Fprintf(out, "          %s: %s\n", m.Field, m.Message)
			} else {
				fmt.Fprintf(out, "          %s\n", m.Message)
			}
		}
	}
	fmt.Fprintf(out, "%d documents: %d applied, %d warned, %d dry-run, %d rejected\n", len(report),
		counts["applied"], counts["warned"], counts["dry-run"], counts["rejected"])
}

// effectiveView is the part of a snapshot's JSON that check prints.
type effectiveView struct {
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
	Peer      struct {
		Mode  string            `json:"mode"`
		Ports map[string]string `json:"port_modes"`
	} `json:"peer_authentication"`
	Authz []json.RawMessage `json:"authorization_policies"`
}

func printEffective(out io.Writer, snap *policy.Snapshot) {
	b, err := snap.MarshalJSON()
	var v effectiveView
	if err == nil {
		err = json.Unmarshal(b, &v)
	}
	if err != nil {
		fmt.Fprintf(out, "effective policy: %v\n", err)
		return
	}
	var labels []string
	for k, val := range v.Labels {
		labels = append(labels, k+"="+val)
	}
	sort.Strings(labels)
	fmt.Fprintf(out, "\neffective policy for a workload in namespace %s with labels {%s}:\n", v.Namespace, strings.Join(labels, ", "))
	fmt.Fprintf(out, "  mTLS mode: %s\n", v.Peer.Mode)
	ports := make([]string, 0, len(v.Peer.Ports))
	for p := range v.Peer.Ports {
		ports = append(ports, p)
	}
	sort.Strings(ports)
	for _, p := range ports {
		fmt.Fprintf(out, "  port %s: %s\n", p, v.Peer.Ports[p])
	}
	if len(v.Authz) == 0 {
		fmt.Fprintln(out, "  authorization: no policy; every connection the mTLS mode admits is allowed")
	}
	for _, p := range v.Authz {
		fmt.Fprintf(out, "  authorization: %s\n", p)
	}
}
