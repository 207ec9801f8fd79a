package rendezvous_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// dialFrom connects to the relay from a loopback source address of its own.
func dialFrom(t *testing.T, e *env, src string) (net.Conn, error) {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	return d.Dial("tcp", e.relay.Addr().String())
}

// One address's 1,000 junk connections, each with a random secret, do not
// lock out a real pair from another: the per-source caps refuse the
// flood's excess, counted and logged by source, never by secret.
func TestJunkFromOneAddressLocksNobodyOut(t *testing.T) {
	var logs bytes.Buffer
	var mu sync.Mutex
	r := &rendezvous.Relay{Plain: true, MaxUnpaired: 300, MaxUnpairedPerSource: 100, MaxConnsPerSource: 600, Logger: newLogger(&logs, &mu)}
	e := start(t, r)
	var junk []net.Conn
	t.Cleanup(func() {
		for _, c := range junk {
			_ = c.Close()
		}
	})
	for i := range 1000 {
		c, err := dialFrom(t, e, "127.0.0.2")
		if err != nil {
			t.Fatalf("junk %d: %v", i, err)
		}
		junk = append(junk, c)
		_, _ = fmt.Fprintf(c, "junk-secret-%d\r\n", i) // refused ones fail later, or not at all
	}
	proctest.WaitFor(t, 10*time.Second, "the flood's excess refused", func() bool { return r.Stats().Limited >= 400 })
	if w := r.Waiting(); w > 100 {
		t.Errorf("%d junk connections wait for a partner: the per-source cap is 100", w)
	}
	e.dial.Plain = true
	a, b := e.pairBoth(t, "the-real-one")
	if err := transfer(a, b, 1<<16); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	l := logs.String()
	mu.Unlock()
	if !strings.Contains(l, "source=127.0.0.2") || strings.Contains(l, "junk-secret") {
		t.Errorf("refusals must name the source and no secret:\n%s", l[:min(len(l), 2000)])
	}
}

// waitAlone connects to a plain relay, sends first (its secret line and
// anything after it) and returns once the relay has it waiting.
func waitAlone(t *testing.T, r *rendezvous.Relay, first string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", r.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, first); err != nil {
		t.Fatal(err)
	}
	proctest.WaitFor(t, 10*time.Second, "waiter registered", func() bool { return r.Waiting() == 1 })
	return c
}

// A side whose client closes while it waits is freed at once, and never
// paired with the next one to come.
func TestWaitingSideThatClosesIsFreed(t *testing.T) {
	r := &rendezvous.Relay{Plain: true, PairTimeout: time.Minute}
	e := start(t, r)
	c := waitAlone(t, r, "gone-early\r\n")
	_ = c.Close()
	proctest.WaitFor(t, 10*time.Second, "waiter freed long before the pair timeout", func() bool { return r.Waiting() == 0 && r.Stats().Unpaired == 1 })
	e.dial.Plain = true
	a, b := e.pairBoth(t, "gone-early")
	if err := transfer(a, b, 1<<10); err != nil {
		t.Fatal(err)
	}
}

// What a waiting side sends before its partner comes reaches the partner,
// after the partner's ack and in order.
func TestEarlyBytesReachThePartner(t *testing.T) {
	r := &rendezvous.Relay{Plain: true}
	e := start(t, r)
	c := waitAlone(t, r, "early-bird\r\nsent before the pair")
	defer c.Close()
	u := e.url
	u.Secret = "early-bird"
	e.dial.Plain = true
	b, err := tlsdial.Dial(context.Background(), u, e.dial)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.Pair(context.Background(), u.Secret, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	_ = b.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len("sent before the pair"))
	if _, err := io.ReadFull(b, got); err != nil || string(got) != "sent before the pair" {
		t.Fatalf("partner read %q, %v", got, err)
	}
}

// A spliced pair whose client stops reading ends at the stall bound, and
// one where nothing moves ends at the idle bound; traffic either way keeps
// a pair alive.
func TestSplicedPairBounds(t *testing.T) {
	t.Run("stalled reader", func(t *testing.T) {
		e := start(t, &rendezvous.Relay{SpliceStall: 300 * time.Millisecond})
		a, _ := e.pairBoth(t, "nobody-reads")
		_ = a.SetWriteDeadline(time.Now().Add(30 * time.Second))
		chunk := make([]byte, 1<<20)
		var err error
		for i := 0; i < 512 && err == nil; i++ { // up to 512 MiB; the buffers hold a few
			_, err = a.Write(chunk)
		}
		if err == nil || strings.Contains(err.Error(), "timeout") {
			t.Fatalf("writer: %v: want the relay to end the pair, not our own deadline", err)
		}
	})
	t.Run("idle", func(t *testing.T) {
		e := start(t, &rendezvous.Relay{SpliceIdle: 500 * time.Millisecond})
		a, b := e.pairBoth(t, "quiet")
		// Keep it alive one way for three idle bounds, then stop.
		for range 15 {
			if _, err := a.Write([]byte("x")); err != nil {
				t.Fatalf("the pair ended while a byte moved every 100ms: %v", err)
			}
			time.Sleep(100 * time.Millisecond) // the traffic's pace, not a synchronisation
		}
		_ = b.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(b)
		if len(got) != 15 || err == nil && len(got) == 0 {
			t.Fatalf("read %d bytes, %v: want 15, then the end", len(got), err)
		}
		if err != nil && strings.Contains(err.Error(), "timeout") {
			t.Fatal("the idle pair was not ended by the relay")
		}
	})
}
