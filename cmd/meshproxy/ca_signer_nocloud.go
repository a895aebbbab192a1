//go:build nocloudca

package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/meshproxy/meshproxy/ca"
)

// errCloudSignersNotBuilt is what --signer awspca|googlecas say in a binary
// built without the cloud SDKs (the sidecar image, which must stay small).
var errCloudSignersNotBuilt = errors.New("this meshproxy was built with -tags nocloudca (the sidecar image): run the CA from an image built with --build-arg TAGS=noinject (deploy/Dockerfile)")

func (sf *signerFlags) awsPCAAuthority(context.Context, *slog.Logger, ...ca.Option) (*ca.Authority, func(), error) {
	return nil, nil, errCloudSignersNotBuilt
}

func (sf *signerFlags) googleCASAuthority(context.Context, *slog.Logger, ...ca.Option) (*ca.Authority, func(), error) {
	return nil, nil, errCloudSignersNotBuilt
}

func checkGoogleCASPool(string) error {
	return usagef("--signer googlecas: %v", errCloudSignersNotBuilt)
}
