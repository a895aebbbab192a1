package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshproxy/meshproxy/internal/atomicfile"
	"github.com/meshproxy/meshproxy/internal/fileread"
	"github.com/meshproxy/meshproxy/redirect"
)

// record is what ADD leaves for DEL and CHECK: which capture it installed
// for one container, so neither needs the API server (the pod may be gone).
type record struct {
	ContainerID string          `json:"containerID"`
	Pod         string          `json:"pod"`
	Netns       string          `json:"netns"`
	Capture     redirect.Config `json:"capture"`
}

// maxRecord bounds a record file.
const maxRecord = fileread.MaxState

func recordPath(dir, containerID string) (string, error) {
	if !validContainerID(containerID) {
		return "", fmt.Errorf("CNI_CONTAINERID %q: want letters, digits, '_', '.' or '-'", containerID)
	}
	return filepath.Join(dir, containerID+".json"), nil
}

// saveRecord writes r atomically (a temporary file renamed into place).
func saveRecord(dir string, r record) error {
	path, err := recordPath(dir, r.ContainerID)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode state of %s: %w", r.ContainerID, err)
	}
	if err := atomicfile.Write(path, b, 0o600); err != nil {
		return fmt.Errorf("state of %s: %w", r.ContainerID, err)
	}
	return nil
}

// loadRecord reads the record of a container; ok is false when there is none.
func loadRecord(dir, containerID string) (r record, ok bool, err error) {
	path, err := recordPath(dir, containerID)
	if err != nil {
		return record{}, false, err
	}
	b, err := fileread.Read(path, maxRecord)
	if errors.Is(err, os.ErrNotExist) {
		return record{}, false, nil
	}
	if err != nil {
		return record{}, false, fmt.Errorf("state of %s: %w", containerID, err)
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return record{}, false, fmt.Errorf("state of %s: %s: %w", containerID, path, err)
	}
	if r.ContainerID != containerID {
		return record{}, false, fmt.Errorf("state of %s: %s names container %q", containerID, path, r.ContainerID)
	}
	return r, true, nil
}

func removeRecord(dir, containerID string) error {
	path, err := recordPath(dir, containerID)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove state of %s: %w", containerID, err)
	}
	return nil
}
