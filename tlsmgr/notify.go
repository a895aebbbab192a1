package tlsmgr

import (
	"context"
	"errors"
	"sync"
	"time"
)

// Notifier is implemented by sources that announce changes of their SVID
// or trust bundles (Rotator, FileSource, Static).
type Notifier interface {
	// Subscribe returns a channel that receives a value after every change
	// and a function that ends the subscription and closes the channel.
	// Notifications coalesce: a slow reader sees one value for many changes
	// and should re-read the source's state, never count values.
	Subscribe() (<-chan struct{}, func())
}

// notifier is a coalescing fan-out; its zero value is ready to use.
type notifier struct {
	mu   sync.Mutex
	subs map[chan struct{}]struct{}
}

// Subscribe implements Notifier.
func (n *notifier) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	n.mu.Lock()
	if n.subs == nil {
		n.subs = make(map[chan struct{}]struct{})
	}
	n.subs[ch] = struct{}{}
	n.mu.Unlock()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			n.mu.Lock()
			delete(n.subs, ch)
			n.mu.Unlock()
			close(ch)
		})
	}
}

// notify wakes every subscriber without blocking.
func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	for ch := range n.subs {
		select {
		case ch <- struct{}{}:
		default: // a notification is already pending
		}
	}
}

// WaitReady blocks until src.Ready() returns nil or ctx ends; it returns the
// last readiness error together with ctx's error in the latter case.
func WaitReady(ctx context.Context, src Source) error {
	var changed <-chan struct{}
	if n, ok := src.(Notifier); ok {
		ch, cancel := n.Subscribe()
		defer cancel()
		changed = ch
	}
	// Expiry and sources without notifications are caught by polling.
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		err := src.Ready()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), err)
		case <-changed:
		case <-tick.C:
		}
	}
}
