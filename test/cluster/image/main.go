// Command image writes a container image as a docker-archive tarball from
// files on this machine, with no Docker daemon and no registry: the
// meshproxy image as deploy/Dockerfile describes it (the static binary, CA
// certificates, a passwd entry for uid 1337, user 1337:1337), the demo app
// image and a pause image. `ctr -n k8s.io images import` and
// `kind load image-archive` both read the result.
//
//	image -tag meshproxy:dev -out meshproxy.tar -user 1337:1337 \
//	    -add bin/meshproxy=/usr/local/bin/meshproxy -entrypoint /usr/local/bin/meshproxy
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// addFlags collects repeated -add SRC=DST flags.
type addFlags []string

func (a *addFlags) String() string     { return strings.Join(*a, ",") }
func (a *addFlags) Set(v string) error { *a = append(*a, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	tag := fs.String("tag", "", "image reference, e.g. meshproxy:dev")
	out := fs.String("out", "", "docker-archive tarball to write")
	user := fs.String("user", "", "UID:GID the image runs as; a passwd and group entry named -user-name is added for it")
	userName := fs.String("user-name", "meshproxy", "name of the passwd entry for -user")
	entrypoint := fs.String("entrypoint", "", "absolute path of the entrypoint inside the image")
	expose := fs.String("expose", "", "comma-separated TCP ports the image exposes")
	arch := fs.String("arch", runtime.GOARCH, "architecture the binaries were built for")
	var adds addFlags
	fs.Var(&adds, "add", "SRC=DST: copy file SRC to absolute path DST (mode kept); repeatable")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *tag == "" || *out == "" || *entrypoint == "" {
		return errors.New("-tag, -out and -entrypoint are required")
	}
	ref, err := name.NewTag(*tag)
	if err != nil {
		return fmt.Errorf("tag %q: %w", *tag, err)
	}
	files := map[string]file{}
	for _, a := range adds {
		src, dst, ok := strings.Cut(a, "=")
		if !ok || !path.IsAbs(dst) {
			return fmt.Errorf("-add %q: want SRC=/absolute/DST", a)
		}
		fi, err := os.Stat(src)
		if err != nil {
			return fmt.Errorf("-add %s: %w", a, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("-add %s: not a regular file", a)
		}
		data, err := os.ReadFile(src)
		if err != nil {
			return fmt.Errorf("-add %s: %w", a, err)
		}
		files[path.Clean(dst)] = file{data: data, mode: int64(fi.Mode().Perm())}
	}
	if _, ok := files[path.Clean(*entrypoint)]; !ok {
		return fmt.Errorf("entrypoint %s is not among the -add files", *entrypoint)
	}
	if *user != "" {
		uid, gid, ok := strings.Cut(*user, ":")
		if _, err := strconv.Atoi(uid); !ok || err != nil {
			return fmt.Errorf("-user %q: want UID:GID", *user)
		}
		if _, err := strconv.Atoi(gid); err != nil {
			return fmt.Errorf("-user %q: want UID:GID", *user)
		}
		files["/etc/passwd"] = file{mode: 0o644, data: fmt.Appendf(nil,
			"root:x:0:0:root:/root:/sbin/nologin\n%s:x:%s:%s:%s:/nonexistent:/sbin/nologin\n", *userName, uid, gid, *userName)}
		files["/etc/group"] = file{mode: 0o644, data: fmt.Appendf(nil, "root:x:0:\n%s:x:%s:\n", *userName, gid)}
	}
	layerTar, err := tarOf(files)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("append layer: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS = "linux"
	cfg.Architecture = *arch
	cfg.Config.Entrypoint = []string{*entrypoint}
	cfg.Config.Env = []string{"PATH=" + path.Dir(*entrypoint)}
	cfg.Config.User = *user
	if *expose != "" {
		cfg.Config.ExposedPorts = map[string]struct{}{}
		for p := range strings.SplitSeq(*expose, ",") {
			if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
				return fmt.Errorf("-expose: bad port %q", p)
			}
			cfg.Config.ExposedPorts[p+"/tcp"] = struct{}{}
		}
	}
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return fmt.Errorf("set config: %w", err)
	}
	if err := tarball.WriteToFile(*out, ref, img); err != nil {
		return fmt.Errorf("write %s: %w", *out, err)
	}
	return nil
}

type file struct {
	data []byte
	mode int64
}

// tarOf returns one layer holding files and their parent directories, in a
// fixed order with zero timestamps so the same inputs give the same digest.
func tarOf(files map[string]file) ([]byte, error) {
	dirs := map[string]bool{}
	for p := range files {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var names []string
	for d := range dirs {
		names = append(names, d)
	}
	for p := range files {
		names = append(names, p)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		rel := strings.TrimPrefix(n, "/")
		if dirs[n] {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
			continue
		}
		f := files[n]
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: f.mode, Size: int64(len(f.data)), Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
