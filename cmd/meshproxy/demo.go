package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// PLACEHOLDER: replaced by the real command.
func newDemoCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "demo",
		Hidden: true,
		RunE:   func(*cobra.Command, []string) error { return errors.New("demo: not built yet") },
	}
}
