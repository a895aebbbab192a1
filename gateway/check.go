package gateway

import (
	"encoding/json"
	"log/slog"
	"strings"

	"github.com/meshproxy/meshproxy/internal/manifest"
)

// CheckResult is what `meshproxy check --for gateway` reports for one
// Gateway or VirtualService document.
type CheckResult struct {
	File      string
	Index     int
	Kind      string
	Namespace string
	Name      string
	// Errs are the reasons the gateway refuses the document; none when it
	// loads.
	Errs []string
	// Warnings are the fields it applies the document without, or ignores.
	Warnings []Warning
}

// Warning is one field the gateway does not apply, and why.
type Warning struct {
	Field, Message string
}

// Check runs the gateway's own loader (the one `meshproxy gateway` uses)
// over files: on each Gateway and VirtualService document alone, then on
// all of them together, so a problem between documents (a name defined
// twice, two servers on one port) is reported against the documents it
// names. Other kinds are left to the policy loader. namespace is the
// gateway's namespace, the default of documents without one.
func Check(files []manifest.File, namespace string, log *slog.Logger) []CheckResult {
	wl := workload{namespace: namespace}
	var out []CheckResult
	byWhere := map[string]int{}
	for d, err := range manifest.Objects(files) {
		if err != nil {
			continue // a syntax error: the policy loader reports it
		}
		group, _, kind := d.Kind()
		if group != "networking.istio.io" || (kind != "Gateway" && kind != "VirtualService") {
			continue
		}
		r := CheckResult{File: d.File, Index: d.Index, Kind: kind, Namespace: namespace}
		if obj, err := manifest.DecodeObject[struct{}](manifest.Doc{Where: d.Where, JSON: metadataOnly(d.JSON)}, versions, namespace); err == nil {
			r.Name, r.Namespace = obj.Metadata.Name, obj.Metadata.Namespace
		}
		if _, err := loadConfig([]manifest.File{{Name: d.File, Data: d.JSON}}, wl, log); err != nil {
			r.Errs = append(r.Errs, reasons(err)...)
		}
		byWhere[d.Where] = len(out)
		out = append(out, r)
	}
	_, warns, err := loadConfigWarn(files, wl, log)
	for _, w := range warns {
		for where, i := range byWhere {
			if strings.HasPrefix(w.where, where+" (") || w.where == where {
				out[i].Warnings = append(out[i].Warnings, Warning{Field: w.field, Message: w.msg})
			}
		}
	}
	if err != nil {
		for _, msg := range strings.Split(err.Error(), "\n") {
			for where, i := range byWhere {
				if strings.HasPrefix(msg, where+":") || strings.HasPrefix(msg, where+" (") {
					if len(out[i].Errs) == 0 {
						out[i].Errs = append(out[i].Errs, trimWhere(msg))
					}
				}
			}
		}
	}
	return out
}

// metadataOnly keeps a document's apiVersion, kind and metadata, to read
// its name whatever the state of its spec.
func metadataOnly(raw []byte) []byte {
	var head map[string]any
	if err := json.Unmarshal(raw, &head); err != nil {
		return raw
	}
	out := map[string]any{}
	for _, k := range []string{"apiVersion", "kind", "metadata"} {
		if v, ok := head[k]; ok {
			out[k] = v
		}
	}
	b, err := json.Marshal(out)
	if err != nil {
		return raw
	}
	return b
}

// reasons splits a joined load error into its lines, without the
// "FILE: document N (Kind ns/name): " prefix each carries.
func reasons(err error) []string {
	var out []string
	for _, msg := range strings.Split(err.Error(), "\n") {
		out = append(out, trimWhere(msg))
	}
	return out
}

func trimWhere(msg string) string {
	if i := strings.Index(msg, "): "); i >= 0 && strings.Contains(msg[:i], ": document ") {
		return msg[i+3:]
	}
	if _, rest, ok := strings.Cut(msg, ": document "); ok {
		if _, after, ok := strings.Cut(rest, ": "); ok {
			return after
		}
	}
	return msg
}
