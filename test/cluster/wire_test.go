package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshproxy/meshproxy/internal/e2eutil"
)

// flowKey names one direction of a TCP connection.
type flowKey struct {
	src, dst netip.AddrPort
}

func (k flowKey) String() string { return k.src.String() + "->" + k.dst.String() }

type segment struct {
	seq  uint32
	data []byte
}

// readPcapFlows reads a classic pcap file of Ethernet frames (what tcpdump
// -w writes for a bridge) and returns each IPv4 TCP flow's payload,
// reassembled in sequence order from the first segment seen.
func readPcapFlows(r io.Reader) (map[flowKey][]byte, error) {
	var hdr [24]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("pcap header: %w", err)
	}
	var order binary.ByteOrder
	switch binary.LittleEndian.Uint32(hdr[:4]) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		order = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		order = binary.BigEndian
	default:
		return nil, errors.New("not a pcap file")
	}
	if link := order.Uint32(hdr[20:24]); link != 1 {
		return nil, fmt.Errorf("pcap link type %d, want Ethernet (1)", link)
	}
	segs := map[flowKey][]segment{}
	for {
		var rec [16]byte
		if _, err := io.ReadFull(r, rec[:]); err == io.EOF || err == io.ErrUnexpectedEOF {
			break // tcpdump stopped mid-record at worst
		} else if err != nil {
			return nil, err
		}
		n := order.Uint32(rec[8:12])
		if n > 1<<18 {
			return nil, fmt.Errorf("pcap record of %d bytes", n)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(r, frame); err != nil {
			break
		}
		key, seg, ok := parseTCPFrame(frame)
		if ok && len(seg.data) > 0 {
			segs[key] = append(segs[key], seg)
		}
	}
	flows := map[flowKey][]byte{}
	for key, ss := range segs {
		sort.SliceStable(ss, func(i, j int) bool { return int32(ss[i].seq-ss[0].seq) < int32(ss[j].seq-ss[0].seq) })
		var buf []byte
		next := ss[0].seq
		for _, s := range ss {
			off := int32(next - s.seq)
			if off < 0 {
				break // a gap: keep what is contiguous
			}
			if int(off) < len(s.data) {
				buf = append(buf, s.data[off:]...)
				next = s.seq + uint32(len(s.data))
			}
		}
		flows[key] = buf
	}
	return flows, nil
}

// parseTCPFrame extracts an Ethernet/IPv4/TCP frame's flow and payload.
func parseTCPFrame(frame []byte) (flowKey, segment, bool) {
	if len(frame) < 14+20 || binary.BigEndian.Uint16(frame[12:14]) != 0x0800 {
		return flowKey{}, segment{}, false
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ip[0]>>4 != 4 || ip[9] != 6 || ihl < 20 || total > len(ip) || total < ihl+20 {
		return flowKey{}, segment{}, false
	}
	tcp := ip[ihl:total]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		return flowKey{}, segment{}, false
	}
	src, _ := netip.AddrFromSlice(ip[12:16])
	dst, _ := netip.AddrFromSlice(ip[16:20])
	key := flowKey{
		src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:2])),
		dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:4])),
	}
	return key, segment{seq: binary.BigEndian.Uint32(tcp[4:8]), data: tcp[doff:]}, true
}

// errHelloRead stops the throwaway handshake once the hello is parsed.
var errHelloRead = errors.New("client hello read")

// clientHelloOf parses stream's first TLS ClientHello with crypto/tls itself
// (a throwaway server that stops at GetConfigForClient), as our sniffer does.
func clientHelloOf(stream []byte) (*tls.ClientHelloInfo, error) {
	if len(stream) < 6 || stream[0] != 0x16 || stream[5] != 0x01 {
		return nil, errors.New("not a TLS ClientHello")
	}
	var hello *tls.ClientHelloInfo
	conn := &replayConn{r: bytes.NewReader(stream)}
	err := tls.Server(conn, &tls.Config{GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
		hello = h
		return nil, errHelloRead
	}}).Handshake()
	if hello == nil {
		return nil, fmt.Errorf("parse ClientHello: %w", err)
	}
	return hello, nil
}

// replayConn reads from a buffer and discards writes.
type replayConn struct {
	r io.Reader
}

func (c *replayConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *replayConn) Close() error                     { return nil }
func (c *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *replayConn) SetDeadline(time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(time.Time) error { return nil }

// readPcapFile is readPcapFlows on a file.
func readPcapFile(path string) (map[flowKey][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readPcapFlows(f)
}

// istioHelloes counts the flows from src to dst that open with a TLS
// ClientHello offering Istio's ALPN (meshproxy offers its own HBONE ALPN
// first, which an Envoy peer ignores).
func istioHelloes(flows map[flowKey][]byte, src, dst string) int {
	n := 0
	for key, stream := range flows {
		if key.src.Addr().String() != src || key.dst.Addr().String() != dst {
			continue
		}
		if h, err := clientHelloOf(stream); err == nil && slices.Contains(h.SupportedProtos, "istio") {
			n++
		}
	}
	return n
}

// requestUntilHello runs request at least three times, and on until the
// capture tcpdump is writing to pcap (-U) holds a connection from src to
// dst that opens with a ClientHello offering istio, for 75s at most.
// Requests may ride a pooled HBONE connection opened before the capture
// began, whose hello it never saw; a pooled connection takes new streams
// for 30s at most, so a new one opens within the bound.
func requestUntilHello(pcap, src, dst string, request func()) {
	deadline := time.Now().Add(75 * time.Second)
	for i := 0; ; i++ {
		request()
		flows, err := readPcapFile(pcap)
		if i >= 2 && err == nil && istioHelloes(flows, src, dst) > 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(2 * time.Second)
	}
}

// captureDuring runs the tcpdump command line cmd (perhaps under nsenter,
// without -w or a filter) with the capture filter filter, waits until it
// listens, runs requestUntilHello(pcap, src, dst, request), stops it and
// returns the flows it captured.
func captureDuring(t *testing.T, cmd []string, filter, src, dst string, request func()) map[flowKey][]byte {
	t.Helper()
	pcap := filepath.Join(t.TempDir(), "capture.pcap")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := append(slices.Clone(cmd[1:]), "-U", "-w", pcap, filter)
	dump := exec.CommandContext(ctx, cmd[0], args...)
	dump.Cancel = func() error { return dump.Process.Signal(syscall.SIGINT) }
	dump.WaitDelay = 5 * time.Second
	stderr := &e2eutil.Buffer{}
	dump.Stderr = stderr
	if err := dump.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	waitFor(t, "tcpdump listening", 30*time.Second, func() error {
		if !strings.Contains(stderr.String(), "listening on") {
			return fmt.Errorf("%w: %s", errNotYet, stderr.String())
		}
		return nil
	})
	requestUntilHello(pcap, src, dst, request)
	cancel()
	dump.Wait()
	flows, err := readPcapFile(pcap)
	if err != nil {
		t.Fatalf("read the capture: %v (tcpdump: %s)", err, stderr.String())
	}
	return flows
}
