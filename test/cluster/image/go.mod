// Image writer for meshproxy's single-node test cluster and the demos: builds
// OCI images as docker-archive tarballs from static binaries, with no Docker
// and no registry. A module of its own so go-containerregistry stays out of
// meshproxy's go.mod.
module github.com/meshproxy/meshproxy/test/cluster/image

go 1.26.0

require github.com/google/go-containerregistry v0.22.1

require (
	github.com/klauspost/compress v1.19.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
)
