//go:build noinject

package inject

// Manifest returns ErrNotBuilt: this binary was built with the noinject tag.
func (in *Injector) Manifest([]byte) ([]byte, []Result, error) {
	return nil, nil, ErrNotBuilt
}
