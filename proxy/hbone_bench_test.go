package proxy

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The pooled data path through both sidecars, in process: an app client,
// the client sidecar, the server sidecar and the app, all on loopback.
// "pooled" is the default between meshproxy peers (HBONE negotiated),
// "direct" is per-connection mTLS (--hbone=never). Compare cpu-µs/op, the
// CPU of the whole process (both sidecars, the app and its client) per
// operation: wall time is noise on a shared machine.

// BenchmarkKept is 1 KiB ping-pong on 8 kept app connections at once.
func BenchmarkKept(b *testing.B) {
	for _, mode := range []HBONEMode{HBONEAuto, HBONENever} {
		b.Run(benchName(mode), func(b *testing.B) {
			c := benchChain(b, echo, mode)
			const conns, size = 8, 1024
			cs := make([]net.Conn, conns)
			for i := range cs {
				cs[i] = dial(b, c.entry)
				if err := roundTrip(cs[i], "warm\n"); err != nil {
					b.Fatal(err)
				}
			}
			var next sync.Mutex
			left := 0
			take := func() bool {
				next.Lock()
				defer next.Unlock()
				left--
				return left >= 0
			}
			cpu := startCPU(b)
			left = b.N
			var wg sync.WaitGroup
			for _, conn := range cs {
				wg.Go(func() {
					buf := make([]byte, size)
					for take() {
						if _, err := conn.Write(buf); err != nil {
							b.Error(err)
							return
						}
						if _, err := io.ReadFull(conn, buf); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			cpu.report(b)
		})
	}
}

// BenchmarkBulkDownload moves bytes from the app to its client over one
// app connection; the app sends what the client asks for.
func BenchmarkBulkDownload(b *testing.B) {
	const chunk = 128 << 10
	for _, mode := range []HBONEMode{HBONEAuto, HBONENever} {
		b.Run(benchName(mode), func(b *testing.B) {
			c := benchChain(b, sender, mode)
			conn := dial(b, c.entry)
			b.SetBytes(chunk)
			cpu := startCPU(b)
			var req [8]byte
			binary.BigEndian.PutUint64(req[:], uint64(b.N)*chunk)
			if _, err := conn.Write(req[:]); err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, chunk)
			for range b.N {
				if _, err := io.ReadFull(conn, buf); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}

// sender reads a byte count and sends that many bytes, then closes.
func sender(c net.Conn) {
	defer c.Close()
	var req [8]byte
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return
	}
	buf := make([]byte, 128<<10)
	for n := binary.BigEndian.Uint64(req[:]); n > 0; {
		m := min(n, uint64(len(buf)))
		if _, err := c.Write(buf[:m]); err != nil {
			return
		}
		n -= m
	}
}

func benchName(mode HBONEMode) string {
	if mode == HBONENever {
		return "direct"
	}
	return "pooled"
}

func benchChain(b *testing.B, handle func(net.Conn), mode HBONEMode) hboneChain {
	m := newMesh(b)
	if mode == HBONEAuto {
		return autoChain(b, m, handle, peerAuth("STRICT"), HBONEAuto)
	}
	a := startApp(b, handle)
	st, _ := policyStore(b, peerAuth("STRICT"))
	server := startProxy(b, m.identity(b, echoID), st, WithInboundExplicit("127.0.0.1:0", a.addr()))
	cst, _ := policyStore(b, "")
	client := startProxy(b, m.identity(b, webID), cst,
		WithOutboundExplicit("127.0.0.1:0", server.Addrs()[0].String(), mustID(b, echoID)))
	return hboneChain{client: client, server: server, entry: client.Addrs()[0].String()}
}

// cpuClock is the process's CPU time (user + system) and context switches
// (a thread going to sleep or woken: what goroutine hand-offs cost) since
// a start.
type cpuClock struct {
	start    time.Duration
	switches int64
}

func processCPU(b *testing.B) (time.Duration, int64) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Nvcsw + ru.Nivcsw
}

func startCPU(b *testing.B) cpuClock {
	b.ResetTimer()
	cpu, sw := processCPU(b)
	return cpuClock{start: cpu, switches: sw}
}

func (c cpuClock) report(b *testing.B) {
	b.StopTimer()
	cpu, sw := processCPU(b)
	b.ReportMetric(float64((cpu-c.start).Microseconds())/float64(b.N), "cpu-µs/op")
	b.ReportMetric(float64(sw-c.switches)/float64(b.N), "ctxsw/op")
}
