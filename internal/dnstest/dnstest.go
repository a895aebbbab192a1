// Package dnstest is a DNS server on loopback for tests. It answers A and
// AAAA queries from a fixed table (NXDOMAIN for any other name) and records
// every name it is asked, so a test can point a process's resolver at it
// (meshproxy run --dns-server) and check what the process looked up,
// without a query leaving the machine.
package dnstest

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// Server is a UDP DNS server on 127.0.0.1.
type Server struct {
	conn    net.PacketConn
	answers map[string][]netip.Addr

	mu    sync.Mutex
	asked []string // distinct names, in the order first asked
}

// Start serves answers (names without the trailing dot, any case) on a
// fresh 127.0.0.1 UDP port until the test ends.
func Start(t testing.TB, answers map[string][]netip.Addr) *Server {
	t.Helper()
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("dnstest: listen: %v", err)
	}
	s := &Server{conn: conn, answers: make(map[string][]netip.Addr, len(answers))}
	for name, addrs := range answers {
		s.answers[canonical(name)] = addrs
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.serve()
	}()
	t.Cleanup(func() {
		_ = conn.Close()
		<-done
	})
	return s
}

// Addr is the server's address, IP:PORT.
func (s *Server) Addr() string { return s.conn.LocalAddr().String() }

// Asked returns the distinct names the server was asked about (lower case,
// without the trailing dot), in the order first asked.
func (s *Server) Asked() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.asked)
}

// serve answers until the connection is closed.
func (s *Server) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		if resp, err := s.answer(buf[:n]); err == nil {
			_, _ = s.conn.WriteTo(resp, from)
		}
	}
}

// answer builds the response to one query; a malformed query gets none.
func (s *Server) answer(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	name := canonical(q.Name.String())
	s.mu.Lock()
	if !slices.Contains(s.asked, name) {
		s.asked = append(s.asked, name)
	}
	s.mu.Unlock()
	addrs, known := s.answers[name]
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true}
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	for _, a := range addrs {
		rr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
		switch {
		case q.Type == dnsmessage.TypeA && a.Is4():
			err = b.AResource(rr, dnsmessage.AResource{A: a.As4()})
		case q.Type == dnsmessage.TypeAAAA && a.Is6() && !a.Is4In6():
			err = b.AAAAResource(rr, dnsmessage.AAAAResource{AAAA: a.As16()})
		}
		if err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

func canonical(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }
