package netns

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Segment is the payload of one TCP segment seen on the wire.
type Segment struct {
	SrcPort, DstPort uint16
	Payload          []byte
}

// Sniffer records TCP payloads crossing a pod's veth with an AF_PACKET
// socket (both directions).
type Sniffer struct {
	fd   int
	mu   sync.Mutex
	segs []Segment
	stop chan struct{}
	done chan struct{}
}

// Sniff starts recording on the pod's veth; call Stop to get the segments.
func (p *Pod) Sniff(t testing.TB) *Sniffer {
	t.Helper()
	s := &Sniffer{stop: make(chan struct{}), done: make(chan struct{})}
	err := p.Do(func() error {
		l, err := netlink.LinkByName(p.Veth)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return fmt.Errorf("AF_PACKET socket: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: l.Attrs().Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind AF_PACKET to %s: %w", p.Veth, err)
		}
		// Reads wake up regularly so Stop is noticed.
		tv := unix.NsecToTimeval((100 * time.Millisecond).Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		s.fd = fd
		return nil
	})
	if err != nil {
		t.Fatalf("sniff on %s: %v", p.Veth, err)
	}
	go s.loop()
	t.Cleanup(func() { s.Stop() })
	return s
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (s *Sniffer) loop() {
	defer close(s.done)
	buf := make([]byte, 65536)
	for {
		select {
		case <-s.stop:
			return
		default:
		}
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		if seg, ok := parseFrame(buf[:n]); ok && len(seg.Payload) > 0 {
			s.mu.Lock()
			s.segs = append(s.segs, seg)
			s.mu.Unlock()
		}
	}
}

// Stop ends the capture and returns the segments with payload.
func (s *Sniffer) Stop() []Segment {
	select {
	case <-s.stop:
	default:
		close(s.stop)
		<-s.done
		unix.Close(s.fd)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Segment(nil), s.segs...)
}

// parseFrame extracts a TCP segment from an Ethernet frame.
func parseFrame(f []byte) (Segment, bool) {
	if len(f) < 14 {
		return Segment{}, false
	}
	var l4 []byte
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_IP:
		ip := f[14:]
		if len(ip) < 20 || ip[9] != unix.IPPROTO_TCP {
			return Segment{}, false
		}
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		if ihl < 20 || total > len(ip) || total < ihl {
			return Segment{}, false
		}
		l4 = ip[ihl:total]
	case unix.ETH_P_IPV6:
		ip := f[14:]
		if len(ip) < 40 || ip[6] != unix.IPPROTO_TCP {
			return Segment{}, false
		}
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if 40+plen > len(ip) {
			return Segment{}, false
		}
		l4 = ip[40 : 40+plen]
	default:
		return Segment{}, false
	}
	if len(l4) < 20 {
		return Segment{}, false
	}
	off := int(l4[12]>>4) * 4
	if off < 20 || off > len(l4) {
		return Segment{}, false
	}
	return Segment{
		SrcPort: binary.BigEndian.Uint16(l4[0:2]),
		DstPort: binary.BigEndian.Uint16(l4[2:4]),
		Payload: append([]byte(nil), l4[off:]...),
	}, true
}

// HTTPGet fetches http://addr/path from inside the pod (as root, outside any
// test cgroup) and returns the status code and body.
func (p *Pod) HTTPGet(addr, path string) (int, string, error) {
	var c net.Conn
	if err := p.Do(func() (err error) {
		// The socket is created here, on the namespaced thread.
		c, err = net.DialTimeout("tcp", addr, helperTimeout)
		return err
	}); err != nil {
		return 0, "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(helperTimeout))
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", path, addr); err != nil {
		return 0, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var body []byte
	buf := make([]byte, 4096)
	for len(body) < 1<<20 {
		n, err := resp.Body.Read(buf)
		body = append(body, buf[:n]...)
		if err != nil {
			break
		}
	}
	return resp.StatusCode, string(body), nil
}
