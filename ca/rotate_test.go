package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// initCA runs Init into a fresh directory.
func initCA(t *testing.T, opts ...InitOption) string {
	t.Helper()
	dir := t.TempDir()
	if err := Init(dir, clusterLocal, opts...); err != nil {
		t.Fatal(err)
	}
	return dir
}

func rotate(t *testing.T, dir string, step Step, opts ...InitOption) {
	t.Helper()
	got, err := RotateRoot(dir, step, opts...)
	if err != nil {
		t.Fatalf("rotate %q: %v", step, err)
	}
	if step != "" && got != step {
		t.Fatalf("performed %s, asked for %s", got, step)
	}
}

func rotStatus(t *testing.T, dir string, now time.Time) *RotationStatus {
	t.Helper()
	st, err := RotationStatusOf(dir, now)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	return st
}

func rootsOnDisk(t *testing.T, dir string) []string {
	t.Helper()
	roots, err := parseCertsPEM(readFile(t, filepath.Join(dir, RootCertFile)))
	if err != nil {
		t.Fatal(err)
	}
	var fps []string
	for _, r := range roots {
		fps = append(fps, Fingerprint(r))
	}
	return fps
}

// writeIssued writes a record saying certificates under root fp live until
// until (zero: none issued).
func writeIssued(t *testing.T, dir, fp string, until time.Time) {
	t.Helper()
	r := &rootRecord{Subject: "test", Since: time.Now().Add(-time.Hour)}
	if !until.IsZero() {
		r.add(until, time.Now().Add(-time.Hour))
	}
	data, err := json.Marshal(issuedRecord{Roots: map[string]*rootRecord{fp: r}})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, IssuedRecordFile), data)
}

func TestRotateRootMovesThroughThePhasesInOrder(t *testing.T) {
	dir := initCA(t)
	now := time.Now()
	st := rotStatus(t, dir, now)
	if st.Phase != PhaseIdle || st.NextStep != StepAdd || len(st.Roots) != 1 || st.Roots[0].Role != RoleSigning {
		t.Fatalf("fresh CA: %+v", st)
	}
	oldRoot := st.Roots[0].SHA256

	for _, step := range []Step{StepSwitch, StepRetire} {
		if _, err := RotateRoot(dir, step); !errors.Is(err, ErrRotationOrder) || !strings.Contains(err.Error(), "next step is add") {
			t.Fatalf("%s before add: %v, want ErrRotationOrder naming add", step, err)
		}
	}

	// add: both roots trusted, still signing under the old one.
	rotate(t, dir, "")
	st = rotStatus(t, dir, now)
	if st.Phase != PhaseAdded || st.NextStep != StepSwitch || st.Staged == nil {
		t.Fatalf("after add: %+v", st)
	}
	if fps := rootsOnDisk(t, dir); len(fps) != 2 || fps[0] != oldRoot {
		t.Fatalf("root-cert.pem after add: %v, want the old root then the new", fps)
	}
	newRoot := rootsOnDisk(t, dir)[1]
	if st.Signing.Root != oldRoot || st.Staged.Root != newRoot {
		t.Fatalf("after add the old root signs and the staged certificate is under the new: %+v", st)
	}
	info, err := os.Stat(filepath.Join(dir, NextCAKeyFile))
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("staged key: %v, mode %v; want 0600", err, info.Mode())
	}
	a, err := Load(dir)
	if err != nil {
		t.Fatalf("CA does not load after add: %v", err)
	}
	if got := Fingerprint(a.Roots()[0]); got != oldRoot {
		t.Fatalf("after add the CA signs under %s, want the old root", short(got))
	}
	if _, err := RotateRoot(dir, StepAdd); !errors.Is(err, ErrRotationOrder) {
		t.Fatalf("add twice: %v, want ErrRotationOrder", err)
	}

	// switch: signing under the new root, both trusted, staging gone.
	rotate(t, dir, StepSwitch)
	if a, err = Load(dir); err != nil {
		t.Fatalf("CA does not load after switch: %v", err)
	}
	if got := Fingerprint(a.Roots()[0]); got != newRoot || len(a.Roots()) != 2 {
		t.Fatalf("after switch the CA signs under %s with %d roots, want the new root of 2", short(got), len(a.Roots()))
	}
	for _, f := range []string{NextCACertFile, NextCAKeyFile, NextCertChainFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there after switch: %v", f, err)
		}
	}
	if info, err := os.Stat(filepath.Join(dir, CAKeyFile)); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("ca-key.pem after switch: %v; want mode 0600", err)
	}

	// retire: refused without a record, while certificates live, allowed after.
	if _, err := RotateRoot(dir, ""); !errors.Is(err, ErrCertsOutstanding) || !strings.Contains(err.Error(), "no record") {
		t.Fatalf("retire without a record: %v, want ErrCertsOutstanding saying there is no record", err)
	}
	until := now.Add(time.Hour).Truncate(time.Second)
	writeIssued(t, dir, oldRoot, until)
	_, err = RotateRoot(dir, StepRetire)
	if !errors.Is(err, ErrCertsOutstanding) || !strings.Contains(err.Error(), "1 certificate signed") || !strings.Contains(err.Error(), until.UTC().Format(time.RFC3339)) {
		t.Fatalf("retire with a live certificate: %v, want ErrCertsOutstanding with the count and time", err)
	}
	st = rotStatus(t, dir, now)
	if st.Outstanding == nil || st.Outstanding.Live != 1 || !st.Outstanding.Until.Equal(until) || st.RetireBlocked == "" {
		t.Fatalf("status while certificates are live: %+v", st)
	}
	later := func() time.Time { return until.Add(time.Second) }
	rotate(t, dir, StepRetire, WithInitClock(later))
	if fps := rootsOnDisk(t, dir); len(fps) != 1 || fps[0] != newRoot {
		t.Fatalf("root-cert.pem after retire: %v, want only the new root", fps)
	}
	st = rotStatus(t, dir, now)
	if st.Phase != PhaseIdle || st.NextStep != StepAdd || st.RetiredAt.IsZero() {
		t.Fatalf("after retire: %+v", st)
	}
	if _, err := Load(dir); err != nil {
		t.Fatalf("CA does not load after retire: %v", err)
	}
	// And a new rotation can begin.
	rotate(t, dir, StepAdd)
}

func TestRotateRootRetireForceIgnoresOutstandingCertificates(t *testing.T) {
	dir := initCA(t)
	rotate(t, dir, StepAdd)
	rotate(t, dir, StepSwitch)
	if _, err := RotateRoot(dir, StepRetire, WithForce(true)); err != nil {
		t.Fatalf("forced retire: %v", err)
	}
	if n := len(rootsOnDisk(t, dir)); n != 1 {
		t.Fatalf("%d roots after forced retire, want 1", n)
	}
}

func TestRotateRootRefusesInconsistentState(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  string
	}{
		{"staged files but idle", func(t *testing.T, dir string) {
			rotate(t, dir, StepAdd)
			if err := os.Remove(filepath.Join(dir, RotationStateFile)); err != nil {
				t.Fatal(err)
			}
		}, "interrupted add"},
		{"added but staged files gone", func(t *testing.T, dir string) {
			rotate(t, dir, StepAdd)
			if err := os.Remove(filepath.Join(dir, NextCACertFile)); err != nil {
				t.Fatal(err)
			}
		}, "missing"},
		{"switched but old root removed by hand", func(t *testing.T, dir string) {
			rotate(t, dir, StepAdd)
			rotate(t, dir, StepSwitch)
			a, err := Load(dir)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(dir, RootCertFile), certsPEM(a.Roots()[0]))
		}, "no longer in"},
		{"unknown phase", func(t *testing.T, dir string) {
			writeFile(t, filepath.Join(dir, RotationStateFile), []byte(`{"phase":"halfway"}`))
		}, "unknown phase"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := initCA(t)
			tc.setup(t, dir)
			_, err := RotateRoot(dir, "")
			if !errors.Is(err, ErrRotationState) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrRotationState mentioning %q", err, tc.want)
			}
			if _, err := RotationStatusOf(dir, time.Now()); !errors.Is(err, ErrRotationState) {
				t.Fatalf("status: %v, want ErrRotationState", err)
			}
		})
	}
}

func TestRotateRootKeepsTheKeyAlgorithm(t *testing.T) {
	dir := initCA(t, WithKeyType(KeyECDSAP384))
	rotate(t, dir, StepAdd)
	key, err := parseKeyPEM(readFile(t, filepath.Join(dir, NextCAKeyFile)))
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := key.(*ecdsa.PrivateKey); !ok || k.Curve != elliptic.P384() {
		t.Fatalf("staged key is %T, want ECDSA P-384 like the current one", key)
	}
}

func TestIssuedRecordCountsLiveCertificatesToTheMinute(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	var r rootRecord
	r.add(t0.Add(30*time.Second), t0)
	r.add(t0.Add(50*time.Second), t0)
	r.add(t0.Add(90*time.Second), t0)
	tests := []struct {
		at        time.Time
		wantN     uint64
		wantUntil time.Time
	}{
		{t0, 3, t0.Add(90 * time.Second)},
		{t0.Add(70 * time.Second), 1, t0.Add(90 * time.Second)},
		{t0.Add(90 * time.Second), 0, time.Time{}},
		{t0.Add(time.Hour), 0, time.Time{}},
	}
	for _, tc := range tests {
		n, until := r.live(tc.at)
		if n != tc.wantN || !until.Equal(tc.wantUntil) {
			t.Errorf("at +%s: %d live until %s, want %d until %s", tc.at.Sub(t0), n, until, tc.wantN, tc.wantUntil)
		}
	}
	if r.Issued != 3 || len(r.Live) != 2 {
		t.Fatalf("issued %d in %d buckets, want 3 in 2", r.Issued, len(r.Live))
	}
	// Adding later drops expired buckets: the record stays small.
	r.add(t0.Add(3*time.Hour), t0.Add(2*time.Hour))
	if len(r.Live) != 1 || r.Issued != 4 {
		t.Fatalf("after pruning: %d buckets, %d issued; want 1, 4", len(r.Live), r.Issued)
	}
}

func TestStepsParse(t *testing.T) {
	for _, s := range []string{"add", "switch", "retire"} {
		if _, err := ParseStep(s); err != nil {
			t.Errorf("ParseStep(%q): %v", s, err)
		}
	}
	if _, err := ParseStep("rollback"); err == nil {
		t.Error("ParseStep accepted rollback")
	}
}
