package tlsdial

import (
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
// about 0.45 ms of the 1.7 ms a handshake takes on loopback here
// (docs/BENCHMARKS.md). A resumed session is as authenticated as the one
// whose ticket it uses: crypto/tls checks the cached chain's expiry and
// the server name again.
type Tickets struct {
	mu sync.Mutex
	m  map[string]*tls.ClientSessionState
}

// maxTickets bounds the cache: one ticket per relay name.
const maxTickets = 64

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
	if _, ok := t.m[key]; !ok && len(t.m) >= maxTickets {
		for k := range t.m {
			delete(t.m, k) // any one: a full handshake is all it costs
			break
		}
	}
	t.m[key] = cs
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
	b := binary.BigEndian.AppendUint32(nil, uint32(len(ticket)))
	b = append(b, ticket...)
	return append(b, sb...), nil
}

// Import caches for key the session Export made.
func (t *Tickets) Import(key string, b []byte) error {
	if len(b) < 4 || uint64(len(b)-4) < uint64(binary.BigEndian.Uint32(b)) {
		return errors.New("tls session ticket: truncated")
	}
	n := binary.BigEndian.Uint32(b)
	ticket, sb := b[4:4+n], b[4+n:]
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

// TicketKey is the name crypto/tls caches a dial of u's sessions under
// (its server name, as Dial sets it from base and u).
func TicketKey(base *tls.Config, u URL) string { return clientTLS(base, u.Host).ServerName }
