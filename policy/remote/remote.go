package remote

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshproxy/meshproxy/ca/mirror"
	"github.com/meshproxy/meshproxy/internal/manifest"
	"github.com/meshproxy/meshproxy/metrics"
)

// FileName is the file the documents are written to, in the policy directory.
const FileName = "istio-config-from-ca.yaml"

// Retry bounds while the config server is unreachable or not ready.
const (
	minRetry = time.Second
	maxRetry = 30 * time.Second
)

// Syncer follows a config server and writes what it serves into a directory.
type Syncer struct {
	endpoint string
	client   *http.Client
	dir      string
	wait     time.Duration
	log      *slog.Logger
	version  uint64
}

// Source is the workload's identity: its SVID (client certificate) and the
// trust bundle that authenticates the server (tlsmgr.Source is one).
type Source interface {
	x509svid.Source
	x509bundle.Source
}

// Option configures a Syncer.
type Option func(*Syncer)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Syncer) { s.log = l } }

// WithWait sets how long one request waits for a change on the server
// (default mirror.DefaultWait).
func WithWait(d time.Duration) Option { return func(s *Syncer) { s.wait = d } }

// New returns a Syncer for the config server at addr (HOST:PORT), which
// must present an SVID for serverID, writing into dir (created 0755 if
// missing).
func New(addr string, serverID spiffeid.ID, src Source, dir string, opts ...Option) (*Syncer, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, fmt.Errorf("config server %q: want HOST:PORT: %w", addr, err)
	}
	if serverID.IsZero() {
		return nil, errors.New("config server: empty SPIFFE ID")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("config dir: %w", err)
	}
	s := &Syncer{
		endpoint: (&url.URL{Scheme: "https", Host: addr, Path: mirror.Path}).String(),
		dir:      dir,
		wait:     mirror.DefaultWait,
		log:      slog.Default(),
	}
	for _, o := range opts {
		o(s)
	}
	if s.wait <= 0 {
		s.wait = mirror.DefaultWait
	}
	s.wait = min(s.wait, mirror.MaxWait)
	tlsConf := tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(serverID))
	s.client = &http.Client{
		Transport: &http.Transport{
			TLSClientConfig:     tlsConf,
			TLSHandshakeTimeout: 10 * time.Second,
			MaxIdleConnsPerHost: 1,
			IdleConnTimeout:     90 * time.Second,
		},
		Timeout: s.wait + 30*time.Second,
	}
	return s, nil
}

// Path is the file the Syncer writes.
func (s *Syncer) Path() string { return filepath.Join(s.dir, FileName) }

// HasFile reports whether a previous run left the file in place.
func (s *Syncer) HasFile() bool {
	st, err := os.Stat(s.Path())
	return err == nil && st.Mode().IsRegular()
}

// Sync asks once for a newer version than the last one received, waiting
// up to the Syncer's wait for a change, and writes the documents if they
// differ from the file. It reports whether the file changed.
func (s *Syncer) Sync(ctx context.Context) (bool, error) {
	changed, err := s.sync(ctx)
	switch {
	case err != nil:
		metrics.ConfigFetches.WithLabelValues("failure").Inc()
	case changed:
		metrics.ConfigFetches.WithLabelValues("changed").Inc()
	default:
		metrics.ConfigFetches.WithLabelValues("unchanged").Inc()
	}
	return changed, err
}

func (s *Syncer) sync(ctx context.Context) (bool, error) {
	q := url.Values{"version": {strconv.FormatUint(s.version, 10)}, "wait": {s.wait.String()}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.endpoint+"?"+q.Encode(), nil)
	if err != nil {
		return false, fmt.Errorf("config server: %w", err)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return false, fmt.Errorf("config server: %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotModified:
		return false, nil
	default:
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
		return false, fmt.Errorf("config server %s: %s: %s", s.endpoint, resp.Status, bytes.TrimSpace(msg))
	}
	// The documents, JSON-encoded, plus the envelope: a little over a file's bound.
	body, err := io.ReadAll(io.LimitReader(resp.Body, 2*manifest.MaxFileSize))
	if err != nil {
		return false, fmt.Errorf("config server %s: %w", s.endpoint, err)
	}
	var r mirror.Response
	if err := json.Unmarshal(body, &r); err != nil {
		return false, fmt.Errorf("config server %s: bad response: %w", s.endpoint, err)
	}
	data := render(r)
	if len(data) > manifest.MaxFileSize {
		return false, fmt.Errorf("config server %s: %d bytes of documents, more than the %d a policy file may hold", s.endpoint, len(data), manifest.MaxFileSize)
	}
	s.version = r.Version
	if old, err := os.ReadFile(s.Path()); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := writeAtomic(s.dir, FileName, data); err != nil {
		return false, fmt.Errorf("config dir: %w", err)
	}
	s.log.Info("istio config updated from config server", "version", r.Version, "documents", len(r.Documents), "namespaces", r.Namespaces, "file", s.Path())
	return true, nil
}

// render is the YAML stream of the documents (JSON is YAML), one a line
// between separators, so the loader's "document N" names the Nth.
func render(r mirror.Response) []byte {
	var b bytes.Buffer
	b.WriteString("# Istio config of namespaces")
	for _, ns := range r.Namespaces {
		b.WriteString(" " + ns)
	}
	b.WriteString(", from the CA's config mirror (meshproxy run --config-server). Do not edit: it is rewritten.\n")
	for i, d := range r.Documents {
		if i > 0 {
			b.WriteString(mirror.DocumentSeparator[1:])
		}
		b.Write(d)
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// writeAtomic replaces dir/name with data: a dot-file (which the loader
// skips) is written and synced, then renamed over the file.
func writeAtomic(dir, name string, data []byte) error {
	tmp, err := os.CreateTemp(dir, "."+name+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), filepath.Join(dir, name))
}

// WaitFirst syncs until one answer succeeds or ctx ends, retrying with
// backoff; each failure is logged.
func (s *Syncer) WaitFirst(ctx context.Context) error {
	return s.loop(ctx, true)
}

// Run follows the config server until ctx ends (then it returns nil);
// failures are logged and retried with backoff, and the file keeps the
// last documents received.
func (s *Syncer) Run(ctx context.Context) error {
	return s.loop(ctx, false)
}

func (s *Syncer) loop(ctx context.Context, once bool) error {
	backoff := minRetry
	for {
		_, err := s.Sync(ctx)
		if ctx.Err() != nil {
			if once {
				return ctx.Err()
			}
			return nil
		}
		if err == nil {
			if once {
				return nil
			}
			backoff = minRetry
			continue
		}
		wait := backoff/2 + mrand.N(backoff/2+1)
		s.log.Warn("istio config: config server unavailable; keeping the current policy", "err", err, "retry_in", wait.String())
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			if once {
				return ctx.Err()
			}
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, maxRetry)
	}
}
