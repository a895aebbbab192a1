// Package hbone is a purpose-built HTTP/2 CONNECT data path: one mesh mTLS
// connection carries many app connections as CONNECT streams, in Istio's
// HBONE wire format (ztunnel's, on 15008 with ALPN h2), so a standard
// HTTP/2 client or server interoperates with it.
//
// It speaks only what HBONE needs, on x/net/http2's Framer (reading) and
// hpack (header blocks), not its generic server and transport:
//
//   - no goroutine hand-off per message: one reader goroutine per
//     connection writes a stream's DATA straight to the app socket when the
//     stream is pushed (Stream.PushTo, the forwarder's receive direction)
//     and nothing of it is queued, else into the stream's buffer, which the
//     forwarder drains (a slow app never stalls the reader; see push.go);
//     a DATA frame's payload is read straight into a buffer chunk, which a
//     stream that buffers the whole full frame keeps (crypto/tls's copy is
//     the only one); a stream alone on its connection has a bulk
//     transfer's full frames gathered and written by the reader itself,
//     in one writev, every 512 KiB and before the reader waits for the
//     socket (no hand-off to another thread; see flushBatch);
//     a stream's Write frames its bytes and, when no one else is writing,
//     writes them itself; a bulk stream's write chunk goes out as one DATA
//     frame, written from the app's buffer with no copy into the queue, to
//     a peer that allows frames that long (we advertise
//     SETTINGS_MAX_FRAME_SIZE 512 KiB, and read a longer DATA frame 16 KiB
//     at a time, as if it were that many frames; a peer that keeps the
//     16 KiB default gets 16 KiB frames);
//   - write coalescing: frames that streams queue while a write is in
//     progress go out together in the next one (one TLS record batch, one
//     syscall: CorkConn holds the records of small frames until the
//     last), and a stream's DATA yields once before it leads a write, so
//     streams woken by the same poll share it; a bulk transfer's records
//     reach the socket up to 512 KiB at once (on a host whose TCP paces,
//     the size of those writes sets a transfer's speed); CorkConn reads
//     ahead while data streams in (several records per read);
//   - two write queues: a stream that writes bulk chunks queues all its
//     frames (its END_STREAM and RST_STREAM too, so they keep their
//     order) behind the small queue — control frames, answers, requests —
//     which every write sends first; a request never waits in our queue
//     behind more bulk data than one write carries, nor for room the bulk
//     transfer took;
//   - windows that depend on the company: a stream starts with
//     StreamWindow (1 MiB); alone on its connection, the first refill of a
//     transfer grows it to MaxStreamWindow (16 MiB), so a bulk stream does
//     not wait for WINDOW_UPDATE while a sidecar is not scheduled for a
//     moment, nor within a zone's round trips; while streams share the
//     connection each is refilled to only half of StreamWindow: the bytes
//     a bulk transfer has in flight sit in the same TCP connection as the
//     other streams' frames, ahead of them, so fewer of them shorten that
//     wait. The connection window is returned as data arrives, so one
//     stream that is not read never stalls the others (each stream's
//     buffer is bounded by its own window);
//   - half-close both ways (END_STREAM in either direction first, the other
//     keeps flowing), RST_STREAM on abort, GOAWAY drain.
//
// A Stream is a net.Conn with CloseWrite, so the proxy's forwarder moves
// its bytes as it does a TCP or TLS connection's.
package hbone
