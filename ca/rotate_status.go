package ca

import (
	"crypto/x509"
	"fmt"
	"path/filepath"
	"time"

	"github.com/meshproxy/meshproxy/internal/fileread"
)

// Root roles in a RotationStatus.
const (
	RoleSigning = "signing" // the root the signing certificate chains to
	RoleOld     = "old"     // being rotated out
	RoleNew     = "new"     // being rotated in (phase added: not signing yet)
	RoleTrusted = "trusted" // in the bundle, not part of a rotation
)

// RotationStatus describes a CA directory for `meshproxy ca status`.
type RotationStatus struct {
	Dir         string       `json:"dir"`
	TrustDomain string       `json:"trust_domain"`
	Phase       Phase        `json:"phase"`
	NextStep    Step         `json:"next_step"`
	Roots       []RootStatus `json:"roots"`
	Signing     CertStatus   `json:"signing_certificate"`
	Staged      *CertStatus  `json:"staged_signing_certificate,omitempty"` // phase added
	AddedAt     time.Time    `json:"added_at,omitzero"`
	SwitchedAt  time.Time    `json:"switched_at,omitzero"`
	RetiredAt   time.Time    `json:"retired_at,omitzero"` // of the last completed rotation
	// Outstanding counts the certificates signed under the old root that
	// are still live (phase switched), which hold back the retire step.
	Outstanding *Outstanding `json:"outstanding,omitempty"`
	// RetireBlocked says why retire would be refused now ("" if it would
	// not, or if retire is not the next step).
	RetireBlocked string `json:"retire_blocked,omitempty"`
}

// RootStatus is one root of the trust bundle.
type RootStatus struct {
	SHA256    string    `json:"sha256"`
	Subject   string    `json:"subject"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	Role      string    `json:"role"`
	// Recorded is whether the CA server keeps count of certificates signed
	// under this root (IssuedRecordFile); the counts below are only
	// meaningful if so.
	Recorded      bool      `json:"recorded"`
	RecordedSince time.Time `json:"recorded_since,omitzero"`
	Issued        uint64    `json:"issued_total"`
	Live          uint64    `json:"live_certificates"`
	LiveUntil     time.Time `json:"live_until,omitzero"`
}

// CertStatus describes a signing certificate.
type CertStatus struct {
	Subject  string    `json:"subject"`
	NotAfter time.Time `json:"not_after"`
	Root     string    `json:"root_sha256"`
}

// Outstanding is what holds back retiring the old root.
type Outstanding struct {
	Root     string    `json:"root_sha256"`
	Recorded bool      `json:"recorded"`
	Live     uint64    `json:"live_certificates"`
	Until    time.Time `json:"until,omitzero"`
}

// RotationStatusOf reports the phase, roots, signing certificate and what
// is outstanding for the CA in dir at now.
func RotationStatusOf(dir string, now time.Time) (*RotationStatus, error) {
	f, err := readCAFiles(dir, now)
	if err != nil {
		return nil, fmt.Errorf("ca status: %w", err)
	}
	rec, err := readIssuedRecord(dir)
	if err != nil {
		return nil, fmt.Errorf("ca status: %w", err)
	}
	st := &RotationStatus{
		Dir:         dir,
		TrustDomain: f.td.Name(),
		Phase:       f.state.Phase,
		NextStep:    f.state.Phase.next(),
		Signing:     certStatus(f.signing, f.signRoot),
		AddedAt:     f.state.AddedAt,
		SwitchedAt:  f.state.SwitchedAt,
		RetiredAt:   f.state.RetiredAt,
	}
	for _, r := range f.roots {
		fp := Fingerprint(r)
		rs := RootStatus{SHA256: fp, Subject: r.Subject.String(), NotBefore: r.NotBefore, NotAfter: r.NotAfter, Role: RoleTrusted}
		switch {
		case fp == Fingerprint(f.signRoot):
			rs.Role = RoleSigning
		case f.state.Phase != PhaseIdle && fp == f.state.OldRoot:
			rs.Role = RoleOld
		case f.state.Phase != PhaseIdle && fp == f.state.NewRoot:
			rs.Role = RoleNew
		}
		if rr, ok := rec.Roots[fp]; ok {
			rs.Recorded, rs.RecordedSince, rs.Issued = true, rr.Since, rr.Issued
			rs.Live, rs.LiveUntil = rr.live(now)
		}
		st.Roots = append(st.Roots, rs)
	}
	if f.state.Phase == PhaseAdded {
		if data, err := fileread.Read(filepath.Join(dir, NextCACertFile), fileread.MaxPEM); err == nil {
			if certs, err := parseCertsPEM(data); err == nil {
				if nr := f.root(f.state.NewRoot); nr != nil {
					cs := certStatus(certs[0], nr)
					st.Staged = &cs
				}
			}
		}
	}
	if f.state.Phase == PhaseSwitched {
		out := &Outstanding{Root: f.state.OldRoot}
		if rr, ok := rec.Roots[f.state.OldRoot]; ok {
			out.Recorded = true
			out.Live, out.Until = rr.live(now)
		}
		st.Outstanding = out
		switch {
		case !out.Recorded:
			st.RetireBlocked = fmt.Sprintf("no record of the certificates signed under the old root %s in %s", short(out.Root), IssuedRecordFile)
		case out.Live > 0:
			st.RetireBlocked = fmt.Sprintf("%s signed under the old root %s %s live until %s",
				certificates(out.Live), short(out.Root), isAre(out.Live), out.Until.UTC().Format(time.RFC3339))
		}
	}
	return st, nil
}

func certStatus(c, root *x509.Certificate) CertStatus {
	return CertStatus{Subject: c.Subject.String(), NotAfter: c.NotAfter, Root: Fingerprint(root)}
}
