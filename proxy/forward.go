package proxy

import (
	"net"
	"time"

	fwd "github.com/meshproxy/meshproxy/proxy/forward"
	"github.com/prometheus/client_golang/prometheus"
)

// forward copies between down (the accepted side) and up until both
// directions have ended, counting into t; see forward.Forward.
func forward(t *tracked, down, up net.Conn, idle time.Duration, bytes prometheus.Counter) error {
	return fwd.Forward(down, up, &t.Stats, idle, t.Abort, bytes)
}

var errIdle = fwd.ErrIdle

// closeWrite passes an end of stream on to c.
func closeWrite(c net.Conn) error { return fwd.CloseWrite(c) }
