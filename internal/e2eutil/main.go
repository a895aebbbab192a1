package e2eutil

import (
	"fmt"
	"os"
	"testing"
)

// Main is the whole TestMain of a package that runs the meshproxy binary:
// it builds the binary into a fresh temporary directory (named after pkg),
// stores its path in *bin, runs the tests, removes the directory and exits
// with the tests' status (1 if the build fails).
func Main(m *testing.M, pkg string, bin *string) {
	os.Exit(runMain(m, pkg, bin))
}

func runMain(m *testing.M, pkg string, bin *string) int {
	dir, err := os.MkdirTemp("", "meshproxy-"+pkg+"-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if *bin, err = Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}
