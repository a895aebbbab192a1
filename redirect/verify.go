package redirect

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// ErrNotCaptured means outbound traffic of this process is not redirected:
// the capture the pod relies on is not in place.
var ErrNotCaptured = errors.New("outbound traffic is not captured")

// VerifyOutbound proves that outbound capture is live for the calling
// process, as istio-cni's validation container does: it listens on the
// proxy's outbound port and connects to sentinel, an address that is never
// routed. Only a redirect makes that connection reach the listener; each of
// the bounded attempts waits at most attempt. Run it as a uid other than the
// proxy's, whose traffic the capture exempts, and before the proxy binds
// the port.
func VerifyOutbound(ctx context.Context, outboundPort uint16, sentinel netip.AddrPort, attempts int, attempt time.Duration) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", net.JoinHostPort("", fmt.Sprint(outboundPort)))
	if err != nil {
		return fmt.Errorf("listen on the outbound port %d (is the proxy already running?): %w", outboundPort, err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	var last error
	for i := 0; i < max(attempts, 1); i++ {
		actx, cancel := context.WithTimeout(ctx, attempt)
		var d net.Dialer
		c, err := d.DialContext(actx, "tcp", sentinel.String())
		if err == nil {
			c.Close()
			select {
			case <-accepted:
				cancel()
				return nil
			case <-actx.Done():
				err = fmt.Errorf("connected to %s, but not through the outbound port %d: something else answers there", sentinel, outboundPort)
			}
		}
		<-actx.Done() // pace the attempts: a refused dial returns at once
		cancel()
		last = err
		if ctx.Err() != nil {
			break
		}
	}
	return fmt.Errorf("%w: a connection to %s did not reach the outbound port %d: %w", ErrNotCaptured, sentinel, outboundPort, last)
}
