package wire

import (
	"sync/atomic"
	"time"
)

// Keepalive is protocol v2's keepalive, the same at both ends: a ping
// every Every, and the link lost when nothing at all was heard from the
// peer for PeerTimeout. Either may be negative: off.
type Keepalive struct {
	Every, PeerTimeout time.Duration
	heard              atomic.Int64 // unix nanoseconds of the last frame heard
}

// Heard marks a frame from the peer.
func (k *Keepalive) Heard() { k.heard.Store(time.Now().UnixNano()) }

// Quiet is how long nothing was heard, and whether that is past the peer
// timeout.
func (k *Keepalive) Quiet() (time.Duration, bool) {
	q := time.Since(time.Unix(0, k.heard.Load()))
	return q, k.PeerTimeout > 0 && q > k.PeerTimeout
}

// Run pings through ping and calls lost once the peer timeout passes,
// until stop is closed. Call Heard before Run.
func (k *Keepalive) Run(ping func(), lost func(), stop <-chan struct{}) {
	tick := k.Every
	if k.PeerTimeout > 0 && (tick <= 0 || k.PeerTimeout/3 < tick) {
		tick = k.PeerTimeout / 3
	}
	if tick <= 0 {
		return
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-stop:
			return
		case now := <-t.C:
			if _, dead := k.Quiet(); dead {
				lost()
				return
			}
			if k.Every > 0 && now.Sub(last) >= k.Every {
				last = now
				ping()
			}
		}
	}
}
