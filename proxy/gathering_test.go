package proxy

import (
	"bytes"
	"io"
	"testing"
	"time"

	hb "github.com/meshproxy/meshproxy/proxy/hbone"
	"github.com/meshproxy/meshproxy/proxy/proxytest"
)

// TestMeshWritesOfSeveralRecordsAreCorked: in per-connection mode a write
// of the copy loop that takes several TLS records reaches the mesh socket
// in one write (on a host whose TCP paces, the size of those writes sets a
// transfer's speed); one record is one write; the peer reads every byte.
func TestMeshWritesOfSeveralRecordsAreCorked(t *testing.T) {
	cs, ss := tcpPair(t)
	counted := &proxytest.CountingConn{Conn: cs}
	cork := hb.NewCorkConn(counted)
	client, server := proxytest.TLSPair(t, cork, ss)
	mesh := gatheringTLS{client, cork}

	for _, tc := range []struct {
		name string
		size int
		want int64
	}{
		{"one record", 1 << 10, 1},
		{"a bulk write", 512 << 10, 1}, // 32 records
	} {
		payload := make([]byte, tc.size)
		for i := range payload {
			payload[i] = byte(i * 7 / 5)
		}
		got := make(chan []byte, 1)
		go func() {
			b := make([]byte, len(payload))
			_, _ = io.ReadFull(server, b)
			got <- b
		}()
		before := counted.Writes.Load()
		if n, err := mesh.Write(payload); err != nil || n != len(payload) {
			t.Fatalf("%s: wrote %d, %v; want %d", tc.name, n, err, len(payload))
		}
		if n := counted.Writes.Load() - before; n != tc.want {
			t.Errorf("%s (%d bytes): %d socket writes, want %d", tc.name, tc.size, n, tc.want)
		}
		select {
		case b := <-got:
			if !bytes.Equal(b, payload) {
				t.Errorf("%s: the peer read other bytes than the %d sent", tc.name, len(payload))
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: the peer did not read the write", tc.name)
		}
	}
}
