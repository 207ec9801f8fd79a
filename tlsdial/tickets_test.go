package tlsdial_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// A session one process's dial had resumes in another's, carried as
// bytes (what a worker gives the daemon for the next worker); an empty
// cache, or bytes that are not a session, mean a full handshake.
func TestTicketsCarryASessionToAnotherProcess(t *testing.T) {
	u, roots := fakeRelay(t, func(c net.Conn) {
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			_, _ = io.WriteString(c, wire.Ack)
		}
	})
	dial := func(cache tls.ClientSessionCache) tlsdial.Timings {
		t.Helper()
		cfg := roots.Clone()
		cfg.ClientSessionCache = cache
		c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: cfg})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// The ticket comes after the handshake: Pair's read of the ack
		// takes it in, as a session's does.
		if err := c.Pair(context.Background(), u.Secret, 0); err != nil {
			t.Fatal(err)
		}
		return c.Timings
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
	for _, bad := range [][]byte{nil, {0, 0, 0, 9, 1}, append([]byte{0, 0, 0, 1, 7}, "not a session"...)} {
		if err := (&tlsdial.Tickets{}).Import(key, bad); err == nil {
			t.Errorf("Import(%q) took bytes that are not a session", bad)
		}
	}
}

// BenchmarkDialHandshake is a dial's cost on loopback (TCP connect and
// TLS handshake), a full handshake against one resuming the session a
// Tickets cache carried over, as a worker's does:
//
//	go test -run '^$' -bench DialHandshake -count 5 ./tlsdial
func BenchmarkDialHandshake(b *testing.B) {
	u, roots := fakeRelay(b, func(c net.Conn) {
		if _, err := bufio.NewReader(c).ReadString('\n'); err == nil {
			_, _ = io.WriteString(c, wire.Ack)
		}
	})
	// One paired session, for its ticket.
	first := &tlsdial.Tickets{}
	cfg := roots.Clone()
	cfg.ClientSessionCache = first
	c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: cfg})
	if err != nil {
		b.Fatal(err)
	}
	if err := c.Pair(context.Background(), u.Secret, 0); err != nil {
		b.Fatal(err)
	}
	_ = c.Close()
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
