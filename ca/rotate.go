package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// Files of a root rotation, next to Istio's layout in the CA directory.
const (
	// RotationStateFile records the rotation's phase; only RotateRoot
	// writes it.
	RotationStateFile = "rotation-state.json"
	// IssuedRecordFile records, per root, when the certificates signed
	// under it expire; only the CA server writes it.
	IssuedRecordFile = "rotation-issued.json"
	// The signing certificate, key and chain under the new root, staged by
	// the add step and moved into place by the switch step.
	NextCACertFile    = "next-ca-cert.pem"
	NextCAKeyFile     = "next-ca-key.pem"
	NextCertChainFile = "next-cert-chain.pem"
)

// Phase is where a CA directory stands in a root rotation.
type Phase string

// The phases of a root rotation, in order; retiring returns to PhaseIdle.
const (
	// PhaseIdle: no rotation in progress.
	PhaseIdle Phase = "idle"
	// PhaseAdded: the new root is in the trust bundle; signing still uses
	// the old signing certificate.
	PhaseAdded Phase = "added"
	// PhaseSwitched: signing uses the new signing certificate; the old root
	// is still in the trust bundle.
	PhaseSwitched Phase = "switched"
)

// Step is one step of a root rotation.
type Step string

// The steps of a root rotation, in order.
const (
	StepAdd    Step = "add"
	StepSwitch Step = "switch"
	StepRetire Step = "retire"
)

// Steps lists the steps in order.
var Steps = []Step{StepAdd, StepSwitch, StepRetire}

// ParseStep validates s as a Step.
func ParseStep(s string) (Step, error) {
	if slices.Contains(Steps, Step(s)) {
		return Step(s), nil
	}
	return "", fmt.Errorf("unknown step %q (want add, switch or retire)", s)
}

// next is the step that moves phase p forward.
func (p Phase) next() Step {
	switch p {
	case PhaseAdded:
		return StepSwitch
	case PhaseSwitched:
		return StepRetire
	}
	return StepAdd
}

// Sentinel errors of root rotation; returned errors wrap them with detail.
var (
	// ErrRotationOrder: the step asked for is not the next one.
	ErrRotationOrder = errors.New("root rotation step out of order")
	// ErrCertsOutstanding: retiring would strand certificates that were
	// signed under the old root and have not expired yet.
	ErrCertsOutstanding = errors.New("certificates signed under the old root are still live")
	// ErrRotationState: the rotation state file and the CA files disagree.
	ErrRotationState = errors.New("inconsistent root rotation state")
)

// rotationState is the content of RotationStateFile. After a retire it keeps
// the roots and times of the rotation just completed.
type rotationState struct {
	Phase      Phase     `json:"phase"`
	OldRoot    string    `json:"old_root,omitempty"` // SHA-256 of the root's DER, hex
	NewRoot    string    `json:"new_root,omitempty"`
	AddedAt    time.Time `json:"added_at,omitzero"`
	SwitchedAt time.Time `json:"switched_at,omitzero"`
	RetiredAt  time.Time `json:"retired_at,omitzero"`
}

// Fingerprint is the hex SHA-256 of a certificate's DER, the name roots go
// by in the rotation files and in `ca status`.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// caFiles is a CA directory as found on disk.
type caFiles struct {
	td        spiffeid.TrustDomain
	roots     []*x509.Certificate
	signing   *x509.Certificate
	signRoot  *x509.Certificate
	state     rotationState
	nextFound bool
}

// readCAFiles loads dir's layout and rotation state and checks that they
// agree.
func readCAFiles(dir string, now time.Time) (*caFiles, error) {
	a, err := Load(dir, WithClock(func() time.Time { return now }))
	if err != nil {
		return nil, err
	}
	f := &caFiles{td: a.TrustDomain(), roots: a.Roots()}
	chain := a.Chain()
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: %s has no signing certificate", ErrInvalidCA, dir)
	}
	f.signing = chain[0]
	f.signRoot = f.roots[0] // Load puts the root the chain ends in first
	if f.state, err = readRotationState(dir); err != nil {
		return nil, err
	}
	_, err = os.Lstat(filepath.Join(dir, NextCACertFile))
	f.nextFound = err == nil
	if err := f.check(dir); err != nil {
		return nil, err
	}
	return f, nil
}

func readRotationState(dir string) (rotationState, error) {
	path := filepath.Join(dir, RotationStateFile)
	data, err := fileread.Read(path, fileread.MaxState)
	if errors.Is(err, fs.ErrNotExist) {
		return rotationState{Phase: PhaseIdle}, nil
	}
	if err != nil {
		return rotationState{}, fmt.Errorf("read rotation state: %w", err)
	}
	var st rotationState
	if err := json.Unmarshal(data, &st); err != nil {
		return rotationState{}, fmt.Errorf("%w: %s: %w", ErrRotationState, path, err)
	}
	switch st.Phase {
	case PhaseIdle, PhaseAdded, PhaseSwitched:
	case "":
		st.Phase = PhaseIdle
	default:
		return rotationState{}, fmt.Errorf("%w: %s: unknown phase %q", ErrRotationState, path, st.Phase)
	}
	return st, nil
}

// root returns the root of the bundle with fingerprint fp, or nil.
func (f *caFiles) root(fp string) *x509.Certificate {
	for _, r := range f.roots {
		if Fingerprint(r) == fp {
			return r
		}
	}
	return nil
}

// check refuses a directory whose files contradict the recorded phase, so
// no step builds on a half-finished one.
func (f *caFiles) check(dir string) error {
	st, sign := f.state, Fingerprint(f.signRoot)
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w in %s: %s", ErrRotationState, dir, fmt.Sprintf(format, args...))
	}
	switch st.Phase {
	case PhaseIdle:
		if f.nextFound {
			return bad("%s exists but %s records no rotation in progress (an interrupted add?); remove the next-*.pem files and any root you did not mean to add from %s",
				NextCACertFile, RotationStateFile, RootCertFile)
		}
	case PhaseAdded:
		if f.root(st.NewRoot) == nil {
			return bad("phase added, but the new root %s is not in %s", short(st.NewRoot), RootCertFile)
		}
		if sign != st.OldRoot {
			return bad("phase added, but %s chains to root %s, not to the old root %s", CACertFile, short(sign), short(st.OldRoot))
		}
		if !f.nextFound {
			return bad("phase added, but the staged %s is missing", NextCACertFile)
		}
	case PhaseSwitched:
		if sign != st.NewRoot {
			return bad("phase switched, but %s chains to root %s, not to the new root %s", CACertFile, short(sign), short(st.NewRoot))
		}
		if f.root(st.OldRoot) == nil {
			return bad("phase switched, but the old root %s is no longer in %s", short(st.OldRoot), RootCertFile)
		}
	}
	return nil
}

// certificates says "1 certificate" or "n certificates".
func certificates(n uint64) string {
	if n == 1 {
		return "1 certificate"
	}
	return fmt.Sprintf("%d certificates", n)
}

func isAre(n uint64) string {
	if n == 1 {
		return "is"
	}
	return "are"
}

// short abbreviates a fingerprint for messages.
func short(fp string) string {
	if len(fp) > 16 {
		return fp[:16]
	}
	return fp
}

// RotateRoot performs one step of a zero-downtime root rotation of the CA in
// dir. step "" means the next step of the recorded phase; an explicit step
// that is not the next one is refused with ErrRotationOrder.
//
//   - add: a new root and a signing certificate under it are generated; the
//     root is appended to root-cert.pem, the signing certificate, key and
//     chain are staged as next-*.pem. Signing continues as before. The new
//     root key is not kept (as with Init).
//   - switch: the staged signing certificate, key and chain replace
//     ca-cert.pem, ca-key.pem and cert-chain.pem; both roots stay trusted.
//   - retire: the old root is removed from root-cert.pem. Refused with
//     ErrCertsOutstanding while certificates signed under it are live
//     according to the CA server's record (IssuedRecordFile), or when there
//     is no record, unless WithForce(true).
//
// Of the InitOptions, WithRootTTL, WithCATTL and WithKeyType shape what add
// generates (the key type defaults to that of the current signing key),
// WithForce lets retire proceed and WithInitClock sets the time. A running
// `ca serve` on dir picks up each step's files by itself. It returns the
// step performed.
func RotateRoot(dir string, step Step, opts ...InitOption) (Step, error) {
	o := initOptions{rootTTL: DefaultRootTTL, caTTL: DefaultCATTL, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	now := o.now()
	f, err := readCAFiles(dir, now)
	if err != nil {
		return "", fmt.Errorf("rotate root: %w", err)
	}
	want := f.state.Phase.next()
	if step == "" {
		step = want
	}
	if step != want {
		return "", fmt.Errorf("rotate root: %w: cannot %s in phase %s; the next step is %s", ErrRotationOrder, step, f.state.Phase, want)
	}
	switch step {
	case StepAdd:
		err = rotateAdd(dir, f, o, now)
	case StepSwitch:
		err = rotateSwitch(dir, f, now)
	case StepRetire:
		err = rotateRetire(dir, f, o.force, now)
	default:
		err = fmt.Errorf("unknown step %q", step)
	}
	if err != nil {
		return "", fmt.Errorf("rotate root (%s) in %s: %w", step, dir, err)
	}
	return step, nil
}

func rotateAdd(dir string, f *caFiles, o initOptions, now time.Time) error {
	if o.rootTTL <= 0 || o.caTTL <= 0 {
		return fmt.Errorf("root ttl %s and ca ttl %s must be positive", o.rootTTL, o.caTTL)
	}
	if o.caTTL > o.rootTTL {
		return fmt.Errorf("ca ttl %s exceeds root ttl %s", o.caTTL, o.rootTTL)
	}
	kt := o.keyType
	if kt == "" {
		var err error
		if kt, err = keyTypeOf(f.signing.PublicKey); err != nil {
			return err
		}
	}
	root, caCert, caKey, err := newRootAndCA(f.td, kt, o.rootTTL, o.caTTL, now)
	if err != nil {
		return err
	}
	roots := append(slices.Clone(f.roots), root)
	// What switch will load must load now.
	if _, err := New(caKey, []*x509.Certificate{caCert, root}, roots, WithClock(func() time.Time { return now })); err != nil {
		return fmt.Errorf("check new signing certificate: %w", err)
	}
	keyPEM, err := marshalKeyPEM(caKey)
	if err != nil {
		return err
	}
	if err := replaceFiles(dir, []fileData{
		{NextCACertFile, certsPEM(caCert), 0o644},
		{NextCertChainFile, certsPEM(caCert, root), 0o644},
		{NextCAKeyFile, keyPEM, 0o600},
	}); err != nil {
		return err
	}
	if err := replaceFiles(dir, []fileData{{RootCertFile, certsPEM(roots...), 0o644}}); err != nil {
		return err
	}
	return writeRotationState(dir, rotationState{
		Phase: PhaseAdded, OldRoot: Fingerprint(f.signRoot), NewRoot: Fingerprint(root), AddedAt: now,
	})
}

func rotateSwitch(dir string, f *caFiles, now time.Time) error {
	read := func(name string) ([]byte, error) {
		data, err := fileread.Read(filepath.Join(dir, name), fileread.MaxPEM)
		if err != nil {
			return nil, fmt.Errorf("%w: staged file: %w", ErrRotationState, err)
		}
		return data, nil
	}
	certPEM, err := read(NextCACertFile)
	if err != nil {
		return err
	}
	chainPEM, err := read(NextCertChainFile)
	if err != nil {
		return err
	}
	keyPEM, err := read(NextCAKeyFile)
	if err != nil {
		return err
	}
	certs, err := parseCertsPEM(certPEM)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrRotationState, NextCACertFile, err)
	}
	chain, err := parseCertsPEM(chainPEM)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrRotationState, NextCertChainFile, err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrRotationState, NextCAKeyFile, err)
	}
	next, err := New(key, append(certs, chain...), f.roots, WithClock(func() time.Time { return now }))
	if err != nil {
		return fmt.Errorf("%w: staged signing certificate: %w", ErrRotationState, err)
	}
	if got := Fingerprint(next.Roots()[0]); got != f.state.NewRoot {
		return fmt.Errorf("%w: staged signing certificate chains to root %s, not to the new root %s", ErrRotationState, short(got), short(f.state.NewRoot))
	}
	// The key goes last: a reader that sees the new certificate with the old
	// key fails to load and keeps what it had until the key is in place too.
	if err := replaceFiles(dir, []fileData{
		{CertChainFile, chainPEM, 0o644},
		{CACertFile, certPEM, 0o644},
		{CAKeyFile, keyPEM, 0o600},
	}); err != nil {
		return err
	}
	st := f.state
	st.Phase, st.SwitchedAt = PhaseSwitched, now
	if err := writeRotationState(dir, st); err != nil {
		return err
	}
	var errs []error
	for _, name := range []string{NextCACertFile, NextCertChainFile, NextCAKeyFile} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func rotateRetire(dir string, f *caFiles, force bool, now time.Time) error {
	old := f.root(f.state.OldRoot)
	if !force {
		rec, err := readIssuedRecord(dir)
		if err != nil {
			return err
		}
		r, ok := rec.Roots[f.state.OldRoot]
		if !ok {
			return fmt.Errorf("%w: %s has no record of the certificates signed under the old root %s (has `meshproxy ca serve --dir %s` been running?); retire only when you know they have expired",
				ErrCertsOutstanding, IssuedRecordFile, short(f.state.OldRoot), dir)
		}
		if n, until := r.live(now); n > 0 {
			return fmt.Errorf("%w: %s signed under the old root %s %s live until %s; retire after that",
				ErrCertsOutstanding, certificates(n), short(f.state.OldRoot), isAre(n), until.UTC().Format(time.RFC3339))
		}
	}
	roots := slices.DeleteFunc(slices.Clone(f.roots), old.Equal)
	if err := replaceFiles(dir, []fileData{{RootCertFile, certsPEM(roots...), 0o644}}); err != nil {
		return err
	}
	st := f.state
	st.Phase, st.RetiredAt = PhaseIdle, now
	return writeRotationState(dir, st)
}

// newRootAndCA generates a self-signed root and a signing certificate under
// it for td, as Init does.
func newRootAndCA(td spiffeid.TrustDomain, kt KeyType, rootTTL, caTTL time.Duration, now time.Time) (root, caCert *x509.Certificate, caKey crypto.Signer, err error) {
	rootKey, err := kt.generate()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("generate root key: %w", err)
	}
	stamp := now.UTC().Format("2006-01-02T15:04:05Z")
	root, err = createCA(&x509.Certificate{
		Subject:   pkix.Name{Organization: []string{td.Name()}, CommonName: "meshproxy root CA " + stamp},
		NotBefore: now.Add(-ClockSkew),
		NotAfter:  now.Add(rootTTL),
		URIs:      []*url.URL{td.ID().URL()},
	}, nil, rootKey, rootKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("root: %w", err)
	}
	if caKey, err = kt.generate(); err != nil {
		return nil, nil, nil, fmt.Errorf("generate signing key: %w", err)
	}
	caCert, err = createCA(&x509.Certificate{
		Subject:        pkix.Name{Organization: []string{td.Name()}, CommonName: "meshproxy intermediate CA " + stamp},
		NotBefore:      now.Add(-ClockSkew),
		NotAfter:       now.Add(caTTL),
		URIs:           []*url.URL{td.ID().URL()},
		MaxPathLenZero: true,
	}, root, caKey, rootKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("signing certificate: %w", err)
	}
	return root, caCert, caKey, nil
}

// keyTypeOf names the KeyType of a public key, so a rotation keeps the
// algorithm the CA already uses.
func keyTypeOf(pub crypto.PublicKey) (KeyType, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return KeyECDSAP256, nil
		case elliptic.P384():
			return KeyECDSAP384, nil
		}
	case *rsa.PublicKey:
		if k.N.BitLen() <= 2048 {
			return KeyRSA2048, nil
		}
		return KeyRSA4096, nil
	}
	return "", fmt.Errorf("cannot tell the key type of the signing certificate (%T); give one explicitly", pub)
}

type fileData struct {
	name string
	data []byte
	mode os.FileMode
}

// replaceFiles writes every file to a temporary name, then renames them into
// place in order; on failure the temporaries are removed.
func replaceFiles(dir string, files []fileData) error {
	tmps := make([]string, len(files))
	defer func() {
		for _, t := range tmps {
			if t != "" {
				_ = os.Remove(t)
			}
		}
	}()
	for i, f := range files {
		tmp, err := writeTemp(dir, f.name, f.data, f.mode)
		if err != nil {
			return err
		}
		tmps[i] = tmp
	}
	for i, f := range files {
		if err := os.Rename(tmps[i], filepath.Join(dir, f.name)); err != nil {
			return fmt.Errorf("replace %s: %w", f.name, err)
		}
		tmps[i] = ""
	}
	return nil
}

func writeRotationState(dir string, st rotationState) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode rotation state: %w", err)
	}
	return replaceFiles(dir, []fileData{{RotationStateFile, append(data, '\n'), 0o644}})
}
