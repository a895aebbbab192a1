package policy

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// maxLabelsFile bounds the labels file; Kubernetes caps all labels of an
// object far below this.
const maxLabelsFile = fileread.MaxLabels

// ReadLabelsFile reads a Kubernetes downward API labels file: one
// key="value" a line, the value Go-quoted as the kubelet writes it (an
// unquoted value is accepted too). Keys and values are checked against
// Kubernetes' label syntax; errors name the file and line.
func ReadLabelsFile(path string) (map[string]string, error) {
	data, err := fileread.Read(path, maxLabelsFile)
	if err != nil {
		return nil, fmt.Errorf("labels file: %w", err)
	}
	labels := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxLabelsFile)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fail := func(format string, args ...any) error {
			return fmt.Errorf("labels file %s: line %d: %s", path, n, fmt.Sprintf(format, args...))
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fail("want key=\"value\"")
		}
		key = strings.TrimSpace(key)
		val = strings.TrimSpace(val)
		if strings.HasPrefix(val, `"`) {
			if val, err = strconv.Unquote(val); err != nil {
				return nil, fail("bad quoted value: %v", err)
			}
		}
		if errs := validation.IsQualifiedName(key); len(errs) > 0 {
			return nil, fail("label key %q: %s", key, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(val); len(errs) > 0 {
			return nil, fail("label %s value %q: %s", key, val, strings.Join(errs, "; "))
		}
		if _, dup := labels[key]; dup {
			return nil, fail("label %s set twice", key)
		}
		labels[key] = val
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("labels file %s: %w", path, err)
	}
	return labels, nil
}
