package tlsdial_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// ackRelay is a relay's part in pairing: the secret line read, the ack.
func ackRelay(c net.Conn) {
	if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
		_, _ = io.WriteString(c, wire.Ack)
	}
}

// pairedDial dials u with cfg and pairs (the ticket comes after the
// handshake: Pair's read of the ack takes it in, as a session's does).
func pairedDial(t testing.TB, u tlsdial.URL, cfg *tls.Config) *tlsdial.Conn {
	t.Helper()
	c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: cfg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Pair(context.Background(), u.Secret, 0); err != nil {
		t.Fatal(err)
	}
	return c
}

// A session one process's dial had resumes in another's, carried as
// bytes (what a worker gives the daemon for the next worker); an empty
// cache, or bytes that are not a session, mean a full handshake.
func TestTicketsCarryASessionToAnotherProcess(t *testing.T) {
	u, roots := fakeRelay(t, ackRelay)
	dial := func(cache tls.ClientSessionCache) tlsdial.Timings {
		t.Helper()
		cfg := roots.Clone()
		cfg.ClientSessionCache = cache
		return pairedDial(t, u, cfg).Timings
	}
	key := tlsdial.TicketKey(roots, u)
	first := &tlsdial.Tickets{}
	if tm := dial(first); tm.Resumed {
		t.Fatal("the first dial, with an empty cache, resumed")
	}
	b, err := first.Export(key)
	if err != nil || len(b) == 0 {
		t.Fatalf("Export(%q) = %d bytes, %v: want the relay's session", key, len(b), err)
	}
	next := &tlsdial.Tickets{}
	if err := next.Import(key, b); err != nil {
		t.Fatal(err)
	}
	if tm := dial(next); !tm.Resumed {
		t.Fatal("a dial with the carried session did not resume it")
	}
	if tm := dial(&tlsdial.Tickets{}); tm.Resumed {
		t.Fatal("a dial with an empty cache resumed")
	}
	// A cache whose client certificate is another (rotated) takes none.
	rotated := &tlsdial.Tickets{Identity: [32]byte{1}}
	if err := rotated.Import(key, b); err == nil {
		t.Error("a session made with one client certificate was taken by a cache with another")
	}
	for _, bad := range [][]byte{nil, {0, 0, 0, 9, 1}, append([]byte{0, 0, 0, 1, 7}, "not a session"...), append(b, make([]byte, 1<<20)...)} {
		if err := (&tlsdial.Tickets{}).Import(key, bad); err == nil {
			t.Errorf("Import(%q) took bytes that are not a session", bad)
		}
	}
}

// Sessions in transit are kept per relay name, the newest, for a bounded
// number of names.
func TestCarriedIsBounded(t *testing.T) {
	var c tlsdial.Carried
	c.Keep("relay-a", []byte("one"))
	c.Keep("relay-a", []byte("two"))
	if got := string(c.For("relay-a")); got != "two" {
		t.Fatalf("For = %q, want the newest", got)
	}
	c.Keep("", []byte("nameless"))
	c.Keep("relay-b", make([]byte, 1<<20))
	if c.For("") != nil || c.For("relay-b") != nil {
		t.Fatal("kept a session with no relay name, or one over the size bound")
	}
	kept := 0
	for i := range 1000 {
		c.Keep(fmt.Sprintf("relay-%d", i), []byte("x"))
	}
	for i := range 1000 {
		if c.For(fmt.Sprintf("relay-%d", i)) != nil {
			kept++
		}
	}
	if kept == 0 || kept > 100 || c.For("relay-999") == nil {
		t.Fatalf("%d of 1000 relay names kept, the newest %v: want a bound, the newest among them", kept, c.For("relay-999") != nil)
	}
}

// A snapshot (what a spare starts with) is a copy of what is kept, within
// its byte bound.
func TestCarriedSnapshot(t *testing.T) {
	var c tlsdial.Carried
	if got := c.Snapshot(1 << 20); got != nil {
		t.Fatalf("Snapshot of nothing = %v, want nil", got)
	}
	c.Keep("relay-a", []byte("aaaa"))
	c.Keep("relay-b", []byte("bbbbbb"))
	all := c.Snapshot(1 << 20)
	if len(all) != 2 || string(all["relay-a"]) != "aaaa" || string(all["relay-b"]) != "bbbbbb" {
		t.Fatalf("Snapshot = %q, want both relays' sessions", all)
	}
	delete(all, "relay-a")
	if c.For("relay-a") == nil {
		t.Fatal("changing a snapshot changed what is kept")
	}
	for max, want := range map[int]int{3: 0, 4: 1, 6: 1, 9: 1, 10: 2} {
		got, n := c.Snapshot(max), 0
		for _, b := range got {
			n += len(b)
		}
		if len(got) != want || n > max {
			t.Errorf("Snapshot(%d) = %d sessions of %d bytes, want %d within the bound", max, len(got), n, want)
		}
	}
}

// A TLS 1.2 session is not kept: its state is the connection's master
// secret, which would let whoever it is carried to read that connection.
func TestTicketsKeepNoTLS12Session(t *testing.T) {
	u, roots := fakeRelayWith(t, func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 }, ackRelay)
	cache := &tlsdial.Tickets{}
	cfg := roots.Clone()
	cfg.ClientSessionCache = cache
	c := pairedDial(t, u, cfg)
	if v := c.Conn.(*tls.Conn).ConnectionState().Version; v != tls.VersionTLS12 {
		t.Fatalf("negotiated %x, want TLS 1.2", v)
	}
	if b, err := cache.Export(tlsdial.TicketKey(cfg, u)); b != nil || err != nil {
		t.Fatalf("a TLS 1.2 session was kept (%d bytes, %v)", len(b), err)
	}
}

// A dial that fails for good while it offers a carried session drops the
// session and tries once more, at once, with a full handshake: a ticket
// that breaks dials does not break every session after it.
func TestTicketsDroppedWhenTheDialFails(t *testing.T) {
	u, roots := fakeRelay(t, ackRelay)
	key := tlsdial.TicketKey(roots, u)
	first := &tlsdial.Tickets{}
	cfg := roots.Clone()
	cfg.ClientSessionCache = first
	pairedDial(t, u, cfg)
	ticket, err := first.Export(key)
	if err != nil || ticket == nil {
		t.Fatalf("no session to carry: %v", err)
	}
	// The same name served with another CA's certificate: the dial fails
	// for good, once with the session offered, once without.
	other, _ := fakeRelay(t, func(c net.Conn) { _ = c.(*tls.Conn).Handshake() })
	u.Port = other.Port
	cache := &tlsdial.Tickets{}
	if err := cache.Import(key, ticket); err != nil {
		t.Fatal(err)
	}
	cfg = roots.Clone()
	cfg.ClientSessionCache = cache
	_, err = tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: cfg})
	var de *tlsdial.DialError
	if !errors.As(err, &de) || !de.Permanent || de.Attempts != 2 {
		t.Fatalf("dial = %v, want a permanent failure after 2 attempts (the second without the session)", err)
	}
	if b, _ := cache.Export(key); b != nil {
		t.Fatal("the session offered to a dial that failed for good is still kept")
	}
}

// BenchmarkDialHandshake is a dial's cost on loopback (TCP connect and
// TLS handshake), a full handshake against one resuming the session a
// Tickets cache carried over, as a worker's does:
//
//	go test -run '^$' -bench DialHandshake -count 5 ./tlsdial
func BenchmarkDialHandshake(b *testing.B) {
	u, roots := fakeRelay(b, ackRelay)
	// One paired session, for its ticket.
	first := &tlsdial.Tickets{}
	cfg := roots.Clone()
	cfg.ClientSessionCache = first
	pairedDial(b, u, cfg)
	ticket, err := first.Export(tlsdial.TicketKey(roots, u))
	if err != nil || ticket == nil {
		b.Fatalf("no ticket: %v", err)
	}
	for _, resume := range []bool{false, true} {
		name := map[bool]string{false: "full", true: "resumed"}[resume]
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				cfg := roots.Clone()
				if resume {
					cache := &tlsdial.Tickets{}
					if err := cache.Import(tlsdial.TicketKey(roots, u), ticket); err != nil {
						b.Fatal(err)
					}
					cfg.ClientSessionCache = cache
				}
				c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: cfg})
				if err != nil {
					b.Fatal(err)
				}
				if c.Timings.Resumed != resume {
					b.Fatalf("resumed %v, want %v", c.Timings.Resumed, resume)
				}
				_ = c.Close()
			}
		})
	}
}
