package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Exporter records (-records exporter): the least work a userspace proxy
// pair that encrypts can do per byte, to measure how far this machine lets
// any of them go (issue 17's bulk figures). After the TLS 1.3 handshake the
// pair stops using crypto/tls: each direction seals records with
// AES-128-GCM under a key and IV from the TLS exporter (RFC 8446 7.5), in
// TLS 1.3's record layout (5-byte header as the additional data, nonce =
// IV xor sequence number). The sealing side reads the app socket straight
// into the payloads of up to sealBatch records with one readv, seals them
// in place and writes them with one writev; the opening side reads as much
// as the socket holds, opens the records in place and writes their
// plaintexts to the app with one writev. No user-space copy, a few large
// system calls: what is left is the kernel's copies and the AEAD itself.
//
// It is a benchmark instrument, not a protocol to deploy: no key update,
// no alerts, no padding. A record with an empty payload ends a direction
// (the other side half-closes its app); a stream that ends without one is
// an error, as is a record that does not open.

// Record sizes. sealBatch records (512 KiB) go to the socket in one write:
// on a host whose TCP paces (BBR), the size of the writes to the mesh
// socket sets a transfer's speed (8 records a write made 0.84x; the
// opening side's buffer size changed nothing).
const (
	recHeaderLen = 5
	recTagLen    = 16
	recMaxPlain  = 16 << 10
	recSlot      = recHeaderLen + recMaxPlain + recTagLen
	sealBatch    = 32
	openBuffer   = 256 << 10
)

// errNoEnd is a direction that ended without its end record.
var errNoEnd = errors.New("peer closed without an end record")

// recordKeys is one direction's AEAD and IV, and the next sequence number.
type recordKeys struct {
	aead cipher.AEAD
	iv   [12]byte
	seq  uint64
}

// exporterKeys derives the keys of the direction called dir ("client" or
// "server": who seals) from the TLS exporter of cs.
func exporterKeys(cs tls.ConnectionState, dir string) (*recordKeys, error) {
	km, err := cs.ExportKeyingMaterial("EXPORTER-tlspipe "+dir+" records", nil, 16+12)
	if err != nil {
		return nil, fmt.Errorf("export keying material: %w", err)
	}
	block, err := aes.NewCipher(km[:16])
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	k := &recordKeys{aead: aead}
	copy(k.iv[:], km[16:])
	return k, nil
}

// nonce sets n to the next record's nonce.
func (k *recordKeys) nonce(n *[12]byte) {
	*n = k.iv
	var seq [8]byte
	binary.BigEndian.PutUint64(seq[:], k.seq)
	for i, b := range seq {
		n[4+i] ^= b
	}
	k.seq++
}

// seal seals the record whose payload (m bytes) is in place in rec after
// its header; rec has room for the tag. It returns the whole record.
func (k *recordKeys) seal(rec []byte, m int) []byte {
	rec[0], rec[1], rec[2] = 23, 3, 3
	binary.BigEndian.PutUint16(rec[3:recHeaderLen], uint16(m+recTagLen))
	var n [12]byte
	k.nonce(&n)
	k.aead.Seal(rec[recHeaderLen:recHeaderLen], n[:], rec[recHeaderLen:recHeaderLen+m], rec[:recHeaderLen])
	return rec[:recHeaderLen+m+recTagLen]
}

// recordLen is the length of the record whose header starts h (at least
// recHeaderLen bytes), or an error if the header is not one of ours.
func recordLen(h []byte) (int, error) {
	l := int(binary.BigEndian.Uint16(h[3:recHeaderLen]))
	if h[0] != 23 || h[1] != 3 || h[2] != 3 || l < recTagLen || l > recMaxPlain+recTagLen {
		return 0, fmt.Errorf("bad record header % x", h[:recHeaderLen])
	}
	return recHeaderLen + l, nil
}

// open opens the next record, rec whole, in place and returns its
// plaintext.
func (k *recordKeys) open(rec []byte) ([]byte, error) {
	var n [12]byte
	k.nonce(&n)
	p, err := k.aead.Open(rec[recHeaderLen:recHeaderLen], n[:], rec[recHeaderLen:], rec[:recHeaderLen])
	if err != nil {
		return nil, fmt.Errorf("record %d: %w", k.seq-1, err)
	}
	return p, nil
}

// sealRecords reads src (a plain TCP connection) until EOF and writes its
// bytes to dst as sealed records, then the end record.
func sealRecords(dst, src net.Conn, k *recordKeys) error {
	sc, ok := src.(syscall.Conn)
	if !ok {
		return fmt.Errorf("exporter records need a socket to read, not %T", src)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	buf := make([]byte, sealBatch*recSlot)
	iov := make([][]byte, sealBatch)
	out := make(net.Buffers, 0, sealBatch)
	for {
		for i := range iov {
			iov[i] = buf[i*recSlot+recHeaderLen : i*recSlot+recHeaderLen+recMaxPlain]
		}
		var (
			n    int
			rerr error
		)
		if err := rc.Read(func(fd uintptr) bool {
			for {
				n, rerr = unix.Readv(int(fd), iov)
				if !errors.Is(rerr, syscall.EINTR) {
					return !errors.Is(rerr, syscall.EAGAIN)
				}
			}
		}); err != nil {
			return fmt.Errorf("read %s: %w", src.RemoteAddr(), err)
		}
		if rerr != nil {
			return fmt.Errorf("read %s: %w", src.RemoteAddr(), rerr)
		}
		out = out[:0]
		end := n == 0
		if end { // EOF: the end record
			out = append(out, k.seal(buf, 0))
		}
		for i := 0; n > 0; i++ {
			m := min(n, recMaxPlain)
			n -= m
			out = append(out, k.seal(buf[i*recSlot:], m))
		}
		w := out
		if _, err := w.WriteTo(dst); err != nil {
			return fmt.Errorf("write %s: %w", dst.RemoteAddr(), err)
		}
		if end {
			return nil
		}
	}
}

// openRecords reads sealed records from src until the end record and
// writes their plaintexts to dst.
func openRecords(dst, src net.Conn, k *recordKeys) error {
	buf := make([]byte, openBuffer)
	out := make(net.Buffers, 0, openBuffer/(recHeaderLen+recTagLen))
	fill, start := 0, 0
	for {
		n, rerr := src.Read(buf[fill:])
		fill += n
		out = out[:0]
		end := false
		for !end && fill-start >= recHeaderLen {
			l, err := recordLen(buf[start:fill])
			if err != nil {
				return err
			}
			if fill-start < l {
				break
			}
			p, err := k.open(buf[start : start+l])
			if err != nil {
				return err
			}
			if len(p) == 0 {
				end = true
			} else {
				out = append(out, p)
			}
			start += l
		}
		if len(out) > 0 {
			w := out
			if _, err := w.WriteTo(dst); err != nil {
				return fmt.Errorf("write %s: %w", dst.RemoteAddr(), err)
			}
		}
		switch {
		case end && start < fill:
			return errors.New("data after the end record")
		case end:
			return nil
		case errors.Is(rerr, io.EOF):
			return errNoEnd
		case rerr != nil:
			return fmt.Errorf("read %s: %w", src.RemoteAddr(), rerr)
		}
		fill = copy(buf, buf[start:fill]) // at most one partial record
		start = 0
	}
}

// relayRecords forwards plain to tc's peer over exporter records, both
// ways, once tc's handshake is done; server tells which end tc is. The
// server's first record (an empty one, not an end) tells the client that
// the server's crypto/tls has stopped reading, so no record of the client's
// can be caught in its buffer.
func relayRecords(tc *tls.Conn, plain net.Conn, server bool) error {
	cs := tc.ConnectionState()
	if cs.Version != tls.VersionTLS13 {
		return errors.New("exporter records need TLS 1.3")
	}
	us, them := "client", "server"
	if server {
		us, them = them, us
	}
	wk, err := exporterKeys(cs, us)
	if err != nil {
		return err
	}
	rk, err := exporterKeys(cs, them)
	if err != nil {
		return err
	}
	raw := tc.NetConn()
	var hello [recHeaderLen + 1 + recTagLen]byte // the ready record: one byte
	if server {
		if _, err := raw.Write(wk.seal(hello[:], 1)); err != nil {
			return fmt.Errorf("write ready record: %w", err)
		}
	} else {
		if _, err := io.ReadFull(raw, hello[:]); err != nil {
			return fmt.Errorf("read ready record: %w", err)
		}
		if l, err := recordLen(hello[:]); err != nil || l != len(hello) {
			return fmt.Errorf("bad ready record: %v", err)
		}
		if _, err := rk.open(hello[:]); err != nil {
			return fmt.Errorf("bad ready record: %w", err)
		}
	}
	return bothWays(func() { raw.Close(); plain.Close() },
		func() error { return sealRecords(raw, plain, wk) },
		func() error {
			if err := openRecords(plain, raw, rk); err != nil {
				return err
			}
			return closeWriteAfter(plain, nil)
		})
}
