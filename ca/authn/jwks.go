package authn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// jwtLeeway tolerates clock skew on exp/nbf/iat.
const jwtLeeway = time.Minute

// jwtAlgorithms are the signature algorithms accepted: what Kubernetes
// service account issuers use.
var jwtAlgorithms = []jose.SignatureAlgorithm{jose.RS256, jose.ES256}

// JWKS authenticates Kubernetes service account JWTs offline, against the
// cluster's JSON Web Key Set (a file, or a URL such as the API server's
// /openid/v1/jwks): signature (RS256/ES256), issuer, audience (default
// "istio-ca"), exp and nbf. The identity comes from the "sub" claim
// system:serviceaccount:NS:SA, or the "kubernetes.io" claim. Unlike a
// TokenReview it cannot notice that the token's pod was deleted; tokens
// stay valid until they expire.
type JWKS struct {
	source     string
	isURL      bool
	issuer     string
	td         spiffeid.TrustDomain
	aud        string
	client     Doer
	refresh    time.Duration
	minRefresh time.Duration
	timeout    time.Duration
	now        func() time.Time
	log        *slog.Logger

	mu      sync.Mutex // serializes fetches
	fetched time.Time  // last fetch attempt (URL) or load
	stamp   fileStamp  // version of the file last loaded (file)
	keys    atomic.Pointer[jose.JSONWebKeySet]
}

// NewJWKS loads the key set from source (a file path or an https:// URL)
// and returns an authenticator for tokens of issuer in trust domain td. A
// URL is re-fetched every refresh period and when a token names an unknown
// key ID; a file is re-read when it changes. The first load must succeed.
func NewJWKS(source, issuer string, td spiffeid.TrustDomain, opts ...Option) (*JWKS, error) {
	o := newOptions(opts)
	if issuer == "" {
		return nil, errors.New("jwks: an issuer is required")
	}
	j := &JWKS{
		source: source, issuer: issuer, td: td, aud: o.audience,
		client: o.client, refresh: o.refresh, minRefresh: o.minRefresh,
		timeout: o.requestTimeout, now: o.now, log: o.log,
	}
	if j.client == nil {
		j.client = http.DefaultClient
	}
	if strings.Contains(source, "://") {
		u, err := url.Parse(source)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("jwks: malformed URL %q", source)
		}
		if u.Scheme != "https" {
			return nil, fmt.Errorf("jwks: URL %q must be https (keys fetched in the clear could be replaced)", source)
		}
		j.isURL = true
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.load(context.Background()); err != nil {
		return nil, err
	}
	return j, nil
}

// Name implements Authenticator.
func (j *JWKS) Name() string { return "jwks" }

// Authenticate implements Authenticator.
func (j *JWKS) Authenticate(ctx context.Context, c Caller) (spiffeid.ID, error) {
	if c.Token == "" {
		return spiffeid.ID{}, fmt.Errorf("%w: no bearer token", ErrNoCredentials)
	}
	if len(c.Token) > maxBearerToken {
		return spiffeid.ID{}, fmt.Errorf("%w: bearer token longer than %d bytes", ErrUnauthenticated, maxBearerToken)
	}
	tok, err := jwt.ParseSigned(c.Token, jwtAlgorithms)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: malformed JWT: %w", ErrUnauthenticated, err)
	}
	if len(tok.Headers) != 1 {
		return spiffeid.ID{}, fmt.Errorf("%w: JWT must have exactly one signature", ErrUnauthenticated)
	}
	kid := tok.Headers[0].KeyID
	j.maybeRefresh(ctx, kid)
	keys := j.candidates(kid)
	if len(keys) == 0 {
		return spiffeid.ID{}, fmt.Errorf("%w: JWT signed by unknown key %q", ErrUnauthenticated, kid)
	}
	var claims struct {
		jwt.Claims
		Kubernetes *struct {
			Namespace      string `json:"namespace"`
			ServiceAccount *struct {
				Name string `json:"name"`
			} `json:"serviceaccount"`
		} `json:"kubernetes.io"`
	}
	verified := false
	for _, k := range keys {
		if err := tok.Claims(k.Key, &claims); err == nil {
			verified = true
			break
		}
	}
	if !verified {
		return spiffeid.ID{}, fmt.Errorf("%w: JWT signature does not verify with key %q", ErrUnauthenticated, kid)
	}
	if claims.Expiry == nil {
		return spiffeid.ID{}, fmt.Errorf("%w: JWT has no exp claim", ErrUnauthenticated)
	}
	err = claims.ValidateWithLeeway(jwt.Expected{
		Issuer:      j.issuer,
		AnyAudience: jwt.Audience{j.aud},
		Time:        j.now(),
	}, jwtLeeway)
	switch {
	case errors.Is(err, jwt.ErrInvalidIssuer):
		return spiffeid.ID{}, fmt.Errorf("%w: JWT issuer %q is not %q", ErrUnauthenticated, claims.Issuer, j.issuer)
	case errors.Is(err, jwt.ErrInvalidAudience):
		return spiffeid.ID{}, fmt.Errorf("%w: JWT is not for audience %q (token audiences %v)", ErrUnauthenticated, j.aud, []string(claims.Audience))
	case errors.Is(err, jwt.ErrExpired):
		return spiffeid.ID{}, fmt.Errorf("%w: JWT expired at %s", ErrUnauthenticated, claims.Expiry.Time().UTC().Format(time.RFC3339))
	case err != nil:
		return spiffeid.ID{}, fmt.Errorf("%w: JWT: %w", ErrUnauthenticated, err)
	}

	var fromClaim string
	if k := claims.Kubernetes; k != nil && k.ServiceAccount != nil && k.Namespace != "" && k.ServiceAccount.Name != "" {
		fromClaim = "system:serviceaccount:" + k.Namespace + ":" + k.ServiceAccount.Name
	}
	user := claims.Subject
	switch {
	case strings.HasPrefix(user, "system:serviceaccount:"):
		if fromClaim != "" && fromClaim != user {
			return spiffeid.ID{}, fmt.Errorf("%w: JWT sub %q disagrees with its kubernetes.io claim %q", ErrUnauthenticated, user, fromClaim)
		}
	case fromClaim != "":
		user = fromClaim
	}
	return ServiceAccountID(j.td, user)
}

// candidates are the keys that may have signed a token with key ID kid:
// that key, or every key when the token names none.
func (j *JWKS) candidates(kid string) []jose.JSONWebKey {
	set := j.keys.Load()
	if kid == "" {
		return set.Keys
	}
	return set.Key(kid)
}

// maybeRefresh re-reads the key set when it is due: a changed file, a URL
// older than the refresh period, or an unknown key ID (rate limited).
func (j *JWKS) maybeRefresh(ctx context.Context, kid string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if !j.isURL {
		if st, err := statFile(j.source); err == nil && st == j.stamp {
			return
		}
	} else {
		age := j.now().Sub(j.fetched)
		unknown := kid != "" && len(j.keys.Load().Key(kid)) == 0
		if age < j.refresh && !(unknown && age >= j.minRefresh) {
			return
		}
	}
	if err := j.load(ctx); err != nil {
		j.log.Error("jwks refresh failed; keeping the last good keys", "source", j.source, "err", err)
	}
}

// load reads the key set; j.mu must be held.
func (j *JWKS) load(ctx context.Context) error {
	var (
		data []byte
		err  error
	)
	if j.isURL {
		j.fetched = j.now()
		data, err = j.fetch(ctx)
	} else {
		var st fileStamp
		if st, err = statFile(j.source); err == nil {
			j.stamp = st
			data, err = fileread.Read(j.source, fileread.MaxBundleDocument)
		}
		if err != nil {
			err = fmt.Errorf("jwks: %w", err)
		}
	}
	if err != nil {
		return err
	}
	set, err := parseJWKS(data)
	if err != nil {
		return fmt.Errorf("jwks %s: %w", j.source, err)
	}
	old := j.keys.Swap(set)
	if old != nil {
		j.log.Info("jwks reloaded", "source", j.source, "keys", len(set.Keys))
	}
	return nil
}

func (j *JWKS) fetch(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, j.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, j.source, nil)
	if err != nil {
		return nil, fmt.Errorf("jwks %s: %w", j.source, err)
	}
	req.Header.Set("Accept", "application/json, application/jwk-set+json")
	resp, err := j.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("jwks %s: %w", j.source, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("jwks %s: %s", j.source, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxAPIResponse+1))
	if err != nil {
		return nil, fmt.Errorf("jwks %s: %w", j.source, err)
	}
	if len(data) > maxAPIResponse {
		return nil, fmt.Errorf("jwks %s: larger than %d bytes", j.source, maxAPIResponse)
	}
	return data, nil
}

// parseJWKS keeps the public signature keys meshproxy can verify with: RSA
// of at least 2048 bits and ECDSA P-256. Private keys are refused, as a
// sign that the wrong file was given.
func parseJWKS(data []byte) (*jose.JSONWebKeySet, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	out := &jose.JSONWebKeySet{}
	for i, k := range set.Keys {
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		switch k.Key.(type) {
		case *rsa.PrivateKey, *ecdsa.PrivateKey:
			return nil, fmt.Errorf("key %d (%q) is a private key; a JWKS must hold public keys only", i, k.KeyID)
		}
		switch pub := k.Key.(type) {
		case *rsa.PublicKey:
			if pub.N.BitLen() < 2048 {
				continue
			}
		case *ecdsa.PublicKey:
			if pub.Curve != elliptic.P256() {
				continue
			}
		default:
			continue
		}
		out.Keys = append(out.Keys, k)
	}
	if len(out.Keys) == 0 {
		return nil, errors.New("no usable signature keys (RSA >= 2048 or ECDSA P-256)")
	}
	return out, nil
}
