//go:build !nocloudca

package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/meshproxy/meshproxy/ca"
	"github.com/meshproxy/meshproxy/ca/awspca"
	"github.com/meshproxy/meshproxy/ca/googlecas"
)

// awsPCAAuthority is the authority of --signer awspca.
func (sf *signerFlags) awsPCAAuthority(ctx context.Context, log *slog.Logger, opts ...ca.Option) (*ca.Authority, func(), error) {
	aopts := []awspca.Option{awspca.WithLogger(log), awspca.WithTemplateARN(sf.awsTemplate)}
	if sf.awsRegion != "" {
		aopts = append(aopts, awspca.WithRegion(sf.awsRegion))
	}
	if sf.awsEndpoint != "" {
		aopts = append(aopts, awspca.WithEndpoint(sf.awsEndpoint))
	}
	if sf.awsRoot != "" {
		roots, err := readRoots("--awspca-root", sf.awsRoot)
		if err != nil {
			return nil, nil, err
		}
		aopts = append(aopts, awspca.WithRoots(roots...))
	}
	s, err := awspca.New(ctx, sf.awsARN, aopts...)
	if err != nil {
		return nil, nil, fmt.Errorf("--signer awspca: %w", err)
	}
	a, err := ca.NewFromSigner(s, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("--signer awspca: %w", err)
	}
	return a, func() {}, nil
}

// googleCASAuthority is the authority of --signer googlecas.
func (sf *signerFlags) googleCASAuthority(ctx context.Context, log *slog.Logger, opts ...ca.Option) (*ca.Authority, func(), error) {
	gopts := []googlecas.Option{googlecas.WithLogger(log), googlecas.WithCertificateAuthority(sf.casCA), googlecas.WithTemplate(sf.casTemplate)}
	if sf.casEndpoint != "" {
		gopts = append(gopts, googlecas.WithEndpoint(sf.casEndpoint))
	}
	if sf.casRoot != "" {
		roots, err := readRoots("--googlecas-root", sf.casRoot)
		if err != nil {
			return nil, nil, err
		}
		gopts = append(gopts, googlecas.WithRoots(roots...))
	}
	s, err := googlecas.New(ctx, sf.casPool, gopts...)
	if err != nil {
		return nil, nil, fmt.Errorf("--signer googlecas: %w", err)
	}
	a, err := ca.NewFromSigner(s, opts...)
	if err != nil {
		s.Close()
		return nil, nil, fmt.Errorf("--signer googlecas: %w", err)
	}
	return a, s.Close, nil
}

// checkGoogleCASPool validates --googlecas-pool.
func checkGoogleCASPool(pool string) error {
	if err := googlecas.CheckPoolName(pool); err != nil {
		return usagef("--googlecas-pool: %v", err)
	}
	return nil
}
