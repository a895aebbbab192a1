//go:build !nocloudca

package main

import (
	"testing"

	"github.com/meshproxy/meshproxy/ca/awspca"
)

func TestAWSPCATemplateDefaultMatchesThePackage(t *testing.T) {
	if defaultAWSPCATemplateARN != awspca.DefaultTemplateARN {
		t.Fatalf("--awspca-template-arn default %q, awspca.DefaultTemplateARN %q", defaultAWSPCATemplateARN, awspca.DefaultTemplateARN)
	}
}
