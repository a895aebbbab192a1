package main

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// testKeys returns two copies of one direction's keys: the sealer's and
// the opener's.
func testKeys(t *testing.T) (seal, open *recordKeys) {
	t.Helper()
	key := make([]byte, 16)
	rand.Read(key)
	mk := func() *recordKeys {
		block, err := aes.NewCipher(key)
		if err != nil {
			t.Fatal(err)
		}
		aead, err := cipher.NewGCM(block)
		if err != nil {
			t.Fatal(err)
		}
		k := &recordKeys{aead: aead}
		copy(k.iv[:], key[4:])
		return k
	}
	return mk(), mk()
}

// sealed runs sealRecords over payload (the app writes it and closes) and
// returns what went on the wire.
func sealed(t *testing.T, k *recordKeys, payload []byte) []byte {
	t.Helper()
	app, in := tcpPair(t)
	wire, out := tcpPair(t)
	go func() {
		app.Write(payload)
		app.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(out)
		got <- b
	}()
	if err := sealRecords(wire, in, k); err != nil {
		t.Fatalf("seal: %v", err)
	}
	wire.CloseWrite()
	return <-got
}

// opened runs openRecords over wire bytes and returns what reached the
// app and the error it ended with.
func opened(t *testing.T, k *recordKeys, wire []byte) ([]byte, error) {
	t.Helper()
	w, src := tcpPair(t)
	dst, app := tcpPair(t)
	go func() {
		w.Write(wire)
		w.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(app)
		got <- b
	}()
	err := openRecords(dst, src, k)
	dst.CloseWrite()
	select {
	case b := <-got:
		return b, err
	case <-time.After(10 * time.Second):
		t.Fatal("app never saw the end")
		return nil, err
	}
}

func TestExporterRecordsCarryEveryByte(t *testing.T) {
	payload := make([]byte, 3<<20+12345) // many batches, a short last record
	rand.Read(payload)
	sk, ok := testKeys(t)
	wire := sealed(t, sk, payload)
	if bytes.Contains(wire, payload[:64]) {
		t.Fatal("plaintext on the wire")
	}
	got, err := opened(t, ok, wire)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("app got %d bytes, want the %d sent", len(got), len(payload))
	}
}

func TestExporterRecordsRefuseWhatWasNotSealed(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int
		edit func(wire []byte) []byte
		want string
	}{
		{"a flipped bit", 100 << 10, func(w []byte) []byte { w[recHeaderLen+40000] ^= 1; return w }, "message authentication failed"},
		{"cut before the end record", 100 << 10, func(w []byte) []byte { return w[:len(w)-(recHeaderLen+recTagLen)] }, errNoEnd.Error()},
		{"a record dropped", 100 << 10, func(w []byte) []byte { return w[recSlot:] }, "message authentication failed"},
		{"a bad header", 100 << 10, func(w []byte) []byte { w[0] = 22; return w }, "bad record header"},
		// Small enough to arrive in one read with what follows it.
		{"bytes after the end", 100, func(w []byte) []byte { return append(w, 23, 3, 3, 0, 16) }, "after the end record"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			payload := make([]byte, tc.size)
			rand.Read(payload)
			sk, ok := testKeys(t)
			wire := tc.edit(sealed(t, sk, payload))
			got, err := opened(t, ok, wire)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("open ended with %v, want %q", err, tc.want)
			}
			if len(got) > 0 && !bytes.Equal(got, payload[:len(got)]) {
				t.Fatal("the app got bytes that were not sent")
			}
		})
	}
}
