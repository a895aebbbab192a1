//go:build noinject

package inject

import (
	"errors"
	"testing"
)

func TestNoinjectBuildRefusesToInject(t *testing.T) {
	inj, err := New(WithMode(ModeEBPF))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := inj.Manifest([]byte("apiVersion: v1\nkind: Pod\n")); !errors.Is(err, ErrNotBuilt) {
		t.Errorf("Manifest = %v, want ErrNotBuilt", err)
	}
	if _, err := New(WithProxyUID(0)); err == nil {
		t.Error("options are still validated")
	}
}
