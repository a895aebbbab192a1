# meshproxy — build, test and demo targets. `make help` lists them.
GO       ?= go
BIN      ?= bin/meshproxy
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
STATICCHECK ?= $(shell command -v staticcheck 2>/dev/null || echo $(shell $(GO) env GOPATH)/bin/staticcheck)

.PHONY: help build test test-short tools cluster-tools cluster-up cluster-down cluster-demo fuzz-short soak lint fmt generate demo demo-netns bench bench-compare image kind-demo kind-down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build the static meshproxy binary into bin/
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/meshproxy

# Test tools are built into a cache outside the checkout (a fresh clone
# reuses them) by scripts/cached-build.sh, which rebuilds only when a module,
# the flags or Go change.
MESHPROXY_CACHE ?= $(HOME)/.cache/meshproxy
TOOLS   := $(MESHPROXY_CACHE)/test-tools
export MESHPROXY_SPIRE_BIN  := $(TOOLS)
export MESHPROXY_STEPCA_BIN := $(TOOLS)/step-ca

test: ## everything: lint, every test (as root for the netns and Kubernetes tests), a short fuzz of each target
	$(MAKE) -j3 --output-sync=target lint tools cluster-tools
	$(GO) test -race -count=1 -timeout 25m ./...
	$(MAKE) fuzz-short

tools: ## build the real SPIRE and step-ca the tests run (separate modules under test/, only the plugins the tests use) into $$MESHPROXY_CACHE/test-tools
	GO=$(GO) scripts/test-tools.sh $(TOOLS)

cluster-tools: ## build Kubernetes v1.37.2, CoreDNS and cert-manager's controller into $$MESHPROXY_CACHE (default ~/.cache/meshproxy) if missing or out of date
	GO=$(GO) test/cluster/tools/build.sh

cluster-up: cluster-tools ## a single-node Kubernetes on this machine (root; test/cluster/up.sh)
	test/cluster/up.sh

cluster-down: ## stop the single-node cluster and remove everything it left (root; idempotent)
	test/cluster/down.sh

cluster-demo: cluster-tools ## the kind demo's steps on the single-node cluster (root; same script and manifests)
	DEMO_PLATFORM=$(CURDIR)/test/cluster/platform.sh deploy/kind/demo.sh

fuzz-short: ## run every fuzz target briefly (FUZZTIME each, default 7s)
	./scripts/fuzz-short.sh

soak: ## 10-minute soak with rotations every 30s; prints RSS/goroutines and a verdict (not in CI)
	$(GO) run ./bench/soak -duration 10m

test-short: ## unit tests only, no lint
	$(GO) test -count=1 -short ./...

# go vet and staticcheck compile the module as it ships and as the tests
# build it (static, -trimpath: e2eutil.BuildCommand), so one compile of the
# dependencies serves all; CGO_ENABLED or -trimpath alone changes every package.
lint: ## gofmt, go vet, staticcheck and shellcheck (scripts/) must be clean
	shellcheck scripts/*.sh
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	CGO_ENABLED=0 $(GO) vet -trimpath ./...
	CGO_ENABLED=0 GOFLAGS="$$($(GO) env GOFLAGS) -trimpath" $(STATICCHECK) ./...

fmt: ## format the code
	gofmt -w $$(git ls-files '*.go')

generate: ## rebuild generated eBPF objects (needs clang)
	$(GO) generate ./redirect/...

demo: build ## a CA, two sidecars and an echo app on loopback, narrated
	./$(BIN) demo

demo-netns: build ## the transparent path in network namespaces (root)
	MESHPROXY_BIN=$(CURDIR)/$(BIN) ./scripts/demo-netns.sh

bench: ## go benchmarks (handshakes, signing, sniffing, copy loop)
	$(GO) test -run '^$$' -bench . -benchmem ./...

# The meshproxy of issue 17's "today" (main when it was filed), measured in
# the same run as peer meshproxy-baseline; BENCH_BASELINE= leaves it out.
BENCH_BASELINE ?= 72e7d29

bench-compare: ## meshproxy vs HAProxy, stunnel and ghostunnel pairs on loopback, same PKI and load (~6 min; QUICK=1 ~1.5 min)
	$(GO) run ./bench/cmd/compare $(if $(QUICK),-quick) $(if $(BENCH_BASELINE),-baseline-ref $(BENCH_BASELINE))

clean: ## remove build output
	rm -rf bin

image: ## build the container image meshproxy:dev (needs a Docker engine)
	docker build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) -t meshproxy:dev .

kind-demo: ## meshproxy on a local kind cluster: CA, injected workloads, STRICT mTLS (needs kind, kubectl, docker, go)
	deploy/kind/demo.sh

kind-down: ## delete the kind demo cluster
	deploy/kind/down.sh
