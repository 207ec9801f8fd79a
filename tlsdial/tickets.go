package tlsdial

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// Tickets is a tls.ClientSessionCache (Config.TLS.ClientSessionCache) that
// keeps the newest session per server name and can carry one to another
// process: a worker per session starts with an empty cache, so without a
// ticket from the session before it every dial is a full handshake (the
// relay's certificate chain verified, its signature made and checked),
// about 0.4 ms of the 1.7 ms a handshake takes on loopback here
// (docs/BENCHMARKS.md).
//
// What Import takes is trusted as the verification of a chain: crypto/tls
// checks again only the chain's dates, its root against the current roots
// and the server name, not the signatures along it. So bytes for Import
// come only from a process as trusted as this one (the daemon's own
// workers), never from a peer. Dial keeps only TLS 1.3 sessions: a TLS
// 1.2 session's state is its master secret, with which whoever holds it
// could read the connection it came from; TLS 1.3's resumption secret
// reveals no traffic, and a resumed handshake makes fresh (EC)DHE keys.
//
// A session keeps the client certificate it was made with (a resumed one
// is that identity again, and so are the sessions it makes), so a session
// is carried only to a cache whose Identity is the same as the exporting
// one's: a rotated client certificate takes effect at the next dial.
type Tickets struct {
	// Identity is what the client presents: set it with IdentityOf
	// before Export and Import.
	Identity [sha256.Size]byte

	mu sync.Mutex
	m  map[string]*tls.ClientSessionState
}

// IdentityOf is the Identity for dials with cfg: its client certificates.
func IdentityOf(cfg *tls.Config) [sha256.Size]byte {
	h := sha256.New()
	if cfg != nil {
		for _, c := range cfg.Certificates {
			for _, der := range c.Certificate {
				h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(der))))
				h.Write(der)
			}
		}
	}
	var id [sha256.Size]byte
	h.Sum(id[:0])
	return id
}

// maxTickets bounds the cache: one ticket per relay name; maxTicketBytes
// an exported session (the relay's chain is most of it: a few KiB).
const (
	maxTickets     = 64
	maxTicketBytes = 64 << 10
)

// Get is tls.ClientSessionCache's.
func (t *Tickets) Get(key string) (*tls.ClientSessionState, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cs, ok := t.m[key]
	return cs, ok
}

// Put is tls.ClientSessionCache's: nil forgets key.
func (t *Tickets) Put(key string, cs *tls.ClientSessionState) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if cs == nil {
		delete(t.m, key)
		return
	}
	if t.m == nil {
		t.m = make(map[string]*tls.ClientSessionState)
	}
	makeRoom(t.m, key)
	t.m[key] = cs
}

// makeRoom makes room in m for key: one entry fewer when m is full and
// key is new (any one: a full handshake is all it costs).
func makeRoom[V any](m map[string]V, key string) {
	if _, ok := m[key]; ok || len(m) < maxTickets {
		return
	}
	for k := range m {
		delete(m, k)
		return
	}
}

// Carried is sessions in transit: what Export made, kept as bytes per
// relay name (the newest, for a bounded number of names) by a process that
// hands them on and never dials with them (the daemon, between workers).
type Carried struct {
	mu sync.Mutex
	m  map[string][]byte
}

// Keep keeps b, from Export, as relay's newest session.
func (c *Carried) Keep(relay string, b []byte) {
	if relay == "" || len(b) == 0 || len(b) > maxTicketBytes {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[string][]byte)
	}
	makeRoom(c.m, relay)
	c.m[relay] = b
}

// For is relay's newest session, or nil.
func (c *Carried) For(relay string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[relay]
}

// Snapshot is what is kept, copied, up to max bytes of sessions in all
// (whichever fit), for a process that dials later: what a spare worker is
// given when it starts. Nil when nothing is kept.
func (c *Carried) Snapshot(max int) map[string][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out map[string][]byte
	for relay, b := range c.m {
		if len(b) > max {
			continue
		}
		max -= len(b)
		if out == nil {
			out = make(map[string][]byte, len(c.m))
		}
		out[relay] = b // never changed in place: Keep stores a new slice
	}
	return out
}

// Export is the session cached for key as bytes for Import, or nil if
// there is none. They hold the session's resumption secret: they go only
// where the agent's own memory may.
func (t *Tickets) Export(key string) ([]byte, error) {
	cs, ok := t.Get(key)
	if !ok {
		return nil, nil
	}
	ticket, state, err := cs.ResumptionState()
	if err != nil || state == nil {
		return nil, err
	}
	sb, err := state.Bytes()
	if err != nil {
		return nil, err
	}
	if len(t.Identity)+4+len(ticket)+len(sb) > maxTicketBytes {
		return nil, nil // not worth carrying
	}
	b := append([]byte(nil), t.Identity[:]...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(ticket)))
	b = append(b, ticket...)
	return append(b, sb...), nil
}

// Import caches for key the session Export made.
func (t *Tickets) Import(key string, b []byte) error {
	if len(b) > maxTicketBytes {
		return fmt.Errorf("tls session ticket: %d bytes, over %d", len(b), maxTicketBytes)
	}
	const head = sha256.Size + 4
	if len(b) < head || uint64(len(b)-head) < uint64(binary.BigEndian.Uint32(b[sha256.Size:])) {
		return errors.New("tls session ticket: truncated")
	}
	if [sha256.Size]byte(b[:sha256.Size]) != t.Identity {
		return errors.New("tls session ticket: made with another client certificate")
	}
	n := binary.BigEndian.Uint32(b[sha256.Size:])
	ticket, sb := b[head:head+n], b[head+n:]
	state, err := tls.ParseSessionState(sb)
	if err != nil {
		return fmt.Errorf("tls session ticket: %w", err)
	}
	cs, err := tls.NewResumptionState(ticket, state)
	if err != nil {
		return fmt.Errorf("tls session ticket: %w", err)
	}
	t.Put(key, cs)
	return nil
}

// offersSession reports whether a dial with cfg offers a session from a
// Tickets cache.
func offersSession(cfg *tls.Config) bool {
	t, ok := cfg.ClientSessionCache.(*Tickets)
	if !ok {
		return false
	}
	_, ok = t.Get(cfg.ServerName)
	return ok
}

// forgetSession drops what cfg's Tickets cache, if it has one, holds for
// cfg's server.
func forgetSession(cfg *tls.Config) {
	if t, ok := cfg.ClientSessionCache.(*Tickets); ok {
		t.Put(cfg.ServerName, nil)
	}
}

// TicketKey is the name crypto/tls caches a dial of u's sessions under
// (its server name, as Dial sets it from base and u).
func TicketKey(base *tls.Config, u URL) string { return clientTLS(base, u.Host).ServerName }
