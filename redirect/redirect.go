package redirect

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"golang.org/x/sys/unix"
)

// Sentinel errors callers can branch on.
var (
	// ErrPermission means the kernel refused for lack of a capability; the
	// message names the capability (CAP_NET_ADMIN, CAP_BPF).
	ErrPermission = errors.New("permission denied")
	// ErrUnsupported means the kernel lacks a feature the mode needs.
	ErrUnsupported = errors.New("kernel lacks a required feature")
	// ErrNotRedirected means a connection reached the proxy without being
	// captured, so it has no original destination other than the proxy.
	ErrNotRedirected = errors.New("connection was not redirected")
)

// Install sets up the capture described by cfg in the calling thread's
// network namespace (and, for ebpf, on cfg.CgroupPath). Installing the same
// config twice changes nothing; installing a different config replaces the
// old one. On failure nothing of this call is left behind.
func Install(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	log := slog.With("mode", cfg.Mode, "tproxy", cfg.TProxy)
	var err error
	switch cfg.Mode {
	case ModeNftables:
		err = installNftables(ctx, cfg)
	case ModeIptables:
		err = installIptables(ctx, cfg)
	case ModeEBPF:
		err = installEBPF(ctx, cfg)
	}
	if err != nil {
		log.Error("redirect install failed", "err", err)
		return fmt.Errorf("install %s capture: %w", cfg.Mode, err)
	}
	log.Info("redirect installed", "inbound_port", cfg.InboundPort, "outbound_port", cfg.OutboundPort,
		"proxy_uid", cfg.ProxyUID, "proxy_gid", cfg.ProxyGID)
	return nil
}

// Uninstall removes what Install(cfg) added and nothing else. Removing a
// capture that is not installed is not an error.
func Uninstall(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	var err error
	switch cfg.Mode {
	case ModeNftables:
		err = uninstallNftables(ctx, cfg)
	case ModeIptables:
		err = uninstallIptables(ctx, cfg)
	case ModeEBPF:
		err = uninstallEBPF(ctx, cfg)
	}
	if err != nil {
		slog.Error("redirect uninstall failed", "mode", cfg.Mode, "err", err)
		return fmt.Errorf("uninstall %s capture: %w", cfg.Mode, err)
	}
	slog.Info("redirect uninstalled", "mode", cfg.Mode)
	return nil
}

// Status reads what is live for cfg's mode.
func Status(ctx context.Context, cfg Config) (*State, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	st := &State{Mode: cfg.Mode}
	var err error
	switch cfg.Mode {
	case ModeNftables:
		err = statusNftables(ctx, cfg, st)
	case ModeIptables:
		err = statusIptables(ctx, cfg, st)
	case ModeEBPF:
		err = statusEBPF(ctx, cfg, st)
	}
	if err != nil {
		return nil, fmt.Errorf("read %s capture status: %w", cfg.Mode, err)
	}
	return st, nil
}

// State is the live capture of one mode.
type State struct {
	Mode       Mode
	Mechanisms []Mechanism // what captures what
	Sections   []Section   // live rules, programs, maps and routes
}

// Mechanism says which kernel mechanism handles one direction.
type Mechanism struct {
	Direction string // outbound, inbound
	How       string // e.g. "nftables nat output: redirect to :15001"
	Installed bool
}

// Section is one titled block of live state (a chain, a program list).
type Section struct {
	Title string
	Lines []string
}

// Installed reports whether every mechanism of the mode is live.
func (s *State) Installed() bool {
	if len(s.Mechanisms) == 0 {
		return false
	}
	for _, m := range s.Mechanisms {
		if !m.Installed {
			return false
		}
	}
	return true
}

// Empty reports whether nothing of the mode is live.
func (s *State) Empty() bool {
	for _, m := range s.Mechanisms {
		if m.Installed {
			return false
		}
	}
	return len(s.Sections) == 0
}

// String renders the state for people.
func (s *State) String() string {
	var b strings.Builder
	switch {
	case s.Installed():
		fmt.Fprintf(&b, "mode %s: installed\n", s.Mode)
	case s.Empty():
		fmt.Fprintf(&b, "mode %s: not installed\n", s.Mode)
	default:
		fmt.Fprintf(&b, "mode %s: PARTIALLY installed (run uninstall, then install)\n", s.Mode)
	}
	for _, m := range s.Mechanisms {
		mark := "missing"
		if m.Installed {
			mark = "live"
		}
		fmt.Fprintf(&b, "  %-8s %s [%s]\n", m.Direction, m.How, mark)
	}
	for _, sec := range s.Sections {
		fmt.Fprintf(&b, "\n%s\n", sec.Title)
		for _, l := range sec.Lines {
			fmt.Fprintf(&b, "  %s\n", l)
		}
	}
	return b.String()
}

// permission turns EPERM/EACCES into ErrPermission naming the capability.
func permission(err error, capability string) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: %s is required (run as root or grant it): %w", ErrPermission, capability, err)
	}
	return err
}
