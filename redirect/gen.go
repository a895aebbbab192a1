package redirect

// The eBPF objects are generated from bpf/capture.c with Debian's clang
// (packages clang, llvm, libbpf-dev, linux-libc-dev) and committed; run
// `go generate ./redirect/...` after changing the C source.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu" -target bpfel,bpfeb capture bpf/capture.c
