package cluster

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"net"
	"slices"
	"testing"
)

// realClientHello returns the first flight of a crypto/tls client offering
// alpn, as it would cross the wire.
func realClientHello(t *testing.T, alpn ...string) []byte {
	t.Helper()
	client, server := net.Pipe()
	defer server.Close()
	go func() {
		c := tls.Client(client, &tls.Config{NextProtos: alpn, InsecureSkipVerify: true, ServerName: "echo"})
		c.Handshake() // fails when server closes; only the hello matters
		client.Close()
	}()
	buf := make([]byte, 64<<10)
	n := 0
	for n < 5 || n < 5+int(binary.BigEndian.Uint16(buf[3:5])) {
		m, err := server.Read(buf[n:])
		if err != nil {
			t.Fatalf("read hello: %v", err)
		}
		n += m
	}
	return buf[:n]
}

// pcapOf writes a pcap of Ethernet/IPv4/TCP frames, one per payload, with
// the given sequence numbers.
func pcapOf(src, dst [4]byte, sport, dport uint16, seqs []uint32, payloads [][]byte) []byte {
	var b bytes.Buffer
	hdr := make([]byte, 24)
	binary.LittleEndian.PutUint32(hdr[0:], 0xa1b2c3d4)
	binary.LittleEndian.PutUint16(hdr[4:], 2)
	binary.LittleEndian.PutUint16(hdr[6:], 4)
	binary.LittleEndian.PutUint32(hdr[16:], 65535)
	binary.LittleEndian.PutUint32(hdr[20:], 1)
	b.Write(hdr)
	for i, p := range payloads {
		frame := make([]byte, 14+20+20+len(p))
		binary.BigEndian.PutUint16(frame[12:], 0x0800)
		ip := frame[14:]
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+20+len(p)))
		ip[9] = 6
		copy(ip[12:], src[:])
		copy(ip[16:], dst[:])
		tcp := ip[20:]
		binary.BigEndian.PutUint16(tcp[0:], sport)
		binary.BigEndian.PutUint16(tcp[2:], dport)
		binary.BigEndian.PutUint32(tcp[4:], seqs[i])
		tcp[12] = 5 << 4
		copy(tcp[20:], p)
		rec := make([]byte, 16)
		binary.LittleEndian.PutUint32(rec[8:], uint32(len(frame)))
		binary.LittleEndian.PutUint32(rec[12:], uint32(len(frame)))
		b.Write(rec)
		b.Write(frame)
	}
	return b.Bytes()
}

// TestWireFindsIstioALPNInSplitHello: a ClientHello split over two TCP
// segments that arrive out of order is reassembled and its ALPN read, which
// is what the wire check relies on to call a connection mesh mTLS.
func TestWireFindsIstioALPNInSplitHello(t *testing.T) {
	hello := realClientHello(t, "istio", "h2")
	half := len(hello) / 2
	pcap := pcapOf([4]byte{10, 244, 0, 5}, [4]byte{10, 244, 0, 6}, 40000, 5678,
		[]uint32{1000 + uint32(half), 1000}, [][]byte{hello[half:], hello[:half]})
	flows, err := readPcapFlows(bytes.NewReader(pcap))
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != 1 {
		t.Fatalf("%d flows, want 1", len(flows))
	}
	for key, stream := range flows {
		if key.String() != "10.244.0.5:40000->10.244.0.6:5678" {
			t.Errorf("flow %s", key)
		}
		h, err := clientHelloOf(stream)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(h.SupportedProtos, []string{"istio", "h2"}) || h.ServerName != "echo" {
			t.Errorf("ALPN %v SNI %q, want [istio h2] and echo", h.SupportedProtos, h.ServerName)
		}
	}
}

// TestWireRejectsPlaintext: an HTTP request is not taken for a ClientHello.
func TestWireRejectsPlaintext(t *testing.T) {
	if _, err := clientHelloOf([]byte("GET / HTTP/1.1\r\nHost: echo\r\n\r\n")); err == nil {
		t.Error("plaintext HTTP parsed as a ClientHello")
	}
	hello := realClientHello(t, "h2")
	h, err := clientHelloOf(hello)
	if err != nil || slices.Contains(h.SupportedProtos, "istio") {
		t.Errorf("a hello without istio: %v, %v", h, err)
	}
}
