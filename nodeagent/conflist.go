package nodeagent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshproxy/meshproxy/internal/atomicfile"
	"github.com/meshproxy/meshproxy/internal/fileread"
)

// ErrNoPrimary means the CNI configuration directory holds no network
// configuration yet: the primary CNI plugin is not installed.
var ErrNoPrimary = errors.New("no primary CNI network configuration")

// maxConf bounds a network configuration file.
const maxConf = fileread.MaxState

// primaryConf returns the network configuration the runtime uses: the
// first *.conflist, *.conf or *.json file of dir in lexical order.
func primaryConf(dir string) (string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "", fmt.Errorf("read CNI configuration directory: %w", err)
	}
	for _, e := range entries { // sorted by name
		switch filepath.Ext(e.Name()) {
		case ".conflist", ".conf", ".json":
			if e.Type().IsRegular() || e.Type()&os.ModeSymlink != 0 {
				return filepath.Join(dir, e.Name()), nil
			}
		}
	}
	return "", fmt.Errorf("%w in %s", ErrNoPrimary, dir)
}

// decodeList reads a network configuration file as a list: a .conf (a
// single plugin) becomes a list of that one plugin.
func decodeList(path string) (map[string]any, error) {
	b, err := fileread.Read(path, maxConf)
	if err != nil {
		return nil, fmt.Errorf("read CNI configuration: %w", err)
	}
	var doc map[string]any
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("CNI configuration %s: %w", path, err)
	}
	if _, ok := doc["plugins"]; ok {
		if _, ok := doc["plugins"].([]any); !ok {
			return nil, fmt.Errorf("CNI configuration %s: plugins is not a list", path)
		}
		return doc, nil
	}
	if _, ok := doc["type"].(string); !ok {
		return nil, fmt.Errorf("CNI configuration %s: neither a list (plugins) nor a plugin (type)", path)
	}
	list := map[string]any{"cniVersion": doc["cniVersion"], "name": doc["name"], "plugins": []any{doc}}
	delete(doc, "cniVersion")
	delete(doc, "name")
	return list, nil
}

// withEntry returns the list's plugins without any of pluginType's entries,
// then entry appended when it is not nil.
func withEntry(list map[string]any, pluginType string, entry map[string]any) []any {
	plugins, _ := list["plugins"].([]any)
	out := make([]any, 0, len(plugins)+1)
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == pluginType {
			continue
		}
		out = append(out, p)
	}
	if entry != nil {
		out = append(out, entry)
	}
	return out
}

// ChainEntry makes sure the primary network configuration in dir ends with
// entry (whose "type" names the plugin), replacing an older entry of the
// same plugin. A single-plugin .conf is turned into a .conflist of the same
// name. It reports the file it changed, or "" when nothing needed to change.
func ChainEntry(dir string, entry map[string]any) (string, error) {
	pluginType, _ := entry["type"].(string)
	if pluginType == "" {
		return "", errors.New("chain entry has no type")
	}
	path, err := primaryConf(dir)
	if err != nil {
		return "", err
	}
	list, err := decodeList(path)
	if err != nil {
		return "", err
	}
	plugins := withEntry(list, pluginType, entry)
	if len(plugins) < 2 {
		return "", fmt.Errorf("CNI configuration %s: no plugin to chain after (%s must not be first)", path, pluginType)
	}
	before, _ := list["plugins"].([]any)
	if jsonEqual(before, plugins) && filepath.Ext(path) == ".conflist" {
		return "", nil
	}
	list["plugins"] = plugins
	target := path
	if filepath.Ext(path) != ".conflist" {
		target = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
	}
	if err := writeJSON(target, list); err != nil {
		return "", err
	}
	if target != path {
		if err := os.Remove(path); err != nil {
			return "", fmt.Errorf("remove %s after converting it to %s: %w", path, target, err)
		}
	}
	return target, nil
}

// UnchainEntry removes pluginType's entries from every network
// configuration list in dir. It reports the files it changed.
func UnchainEntry(dir, pluginType string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read CNI configuration directory: %w", err)
	}
	var changed []string
	for _, e := range entries {
		if filepath.Ext(e.Name()) != ".conflist" {
			continue
		}
		path := filepath.Join(dir, e.Name())
		list, err := decodeList(path)
		if err != nil {
			return changed, err
		}
		before, _ := list["plugins"].([]any)
		after := withEntry(list, pluginType, nil)
		if len(after) == len(before) {
			continue
		}
		list["plugins"] = after
		if err := writeJSON(path, list); err != nil {
			return changed, err
		}
		changed = append(changed, path)
	}
	return changed, nil
}

func jsonEqual(a, b any) bool {
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}

// writeJSON writes v, indented, to path atomically with mode 0644.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}

// sameContent reports whether path already holds data.
func sameContent(path string, data []byte, limit int64) bool {
	b, err := fileread.Read(path, limit)
	return err == nil && bytes.Equal(b, data)
}
