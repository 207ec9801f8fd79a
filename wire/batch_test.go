package wire_test

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/wire"
)

// countingConn records the writes that reach the TCP connection and can
// be made to fail them.
type countingConn struct {
	net.Conn
	mu     sync.Mutex
	writes []int
	fail   error
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fail != nil {
		return 0, c.fail
	}
	c.writes = append(c.writes, len(p))
	return c.Conn.Write(p)
}

func (c *countingConn) count() (n, largest int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.writes {
		largest = max(largest, w)
	}
	return len(c.writes), largest
}

// batchedPair is a TLS connection over loopback TCP whose client side
// writes through a Batcher over a countingConn; the server side reads.
func batchedPair(t *testing.T) (*tls.Conn, *wire.Batcher, *countingConn, *tls.Conn) {
	t.Helper()
	certs, err := rendezvous.NewSelfSignedCerts(rendezvous.DefaultHosts)
	if err != nil {
		t.Fatal(err)
	}
	raw, sraw := relaytest.TCPPair(t)
	cc := &countingConn{Conn: raw}
	b := wire.NewBatcher(cc)
	client := tls.Client(b, &tls.Config{RootCAs: certs.CAPool, ServerName: "127.0.0.1"})
	server := tls.Server(sraw, &tls.Config{Certificates: []tls.Certificate{certs.Server}})
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	_ = client.SetDeadline(time.Now().Add(30 * time.Second)) // watchdog
	_ = server.SetDeadline(time.Now().Add(30 * time.Second))
	errc := make(chan error, 1)
	go func() { errc <- server.Handshake() }()
	if err := client.Handshake(); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return client, b, cc, server
}

// readN reads n bytes from c in the background.
func readN(c io.Reader, n int) <-chan []byte {
	out := make(chan []byte, 1)
	go func() {
		b := make([]byte, n)
		k, _ := io.ReadFull(c, b)
		out <- b[:k]
	}()
	return out
}

func random(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// The records of one batched Write leave in one write(2); the same Write
// unbatched is one write(2) per record (three or more: records are at
// most 16 KiB, smaller at the start of a connection).
func TestBatchOneWritePerWrite(t *testing.T) {
	client, b, cc, server := batchedPair(t)
	data := random(t, 40<<10) // three records
	got := readN(server, 2*len(data))

	before, _ := cc.count()
	if n, err := wire.WriteBatched(b, client, data); n != len(data) || err != nil {
		t.Fatalf("WriteBatched = %d, %v", n, err)
	}
	batched, _ := cc.count()
	if _, err := client.Write(data); err != nil {
		t.Fatal(err)
	}
	plain, _ := cc.count()
	if batched-before != 1 || plain-batched < 3 {
		t.Fatalf("writes to TCP: batched %d (want 1), unbatched %d (want 3 or more)", batched-before, plain-batched)
	}
	if g := <-got; !bytes.Equal(g, append(append([]byte(nil), data...), data...)) {
		t.Fatalf("server read %d bytes, not what was sent", len(g))
	}
}

// A big Write goes out in pieces no larger than the batch bound, and
// close_notify (written by tls between Writes) goes straight out.
func TestBatchBoundsItsBuffer(t *testing.T) {
	client, b, cc, server := batchedPair(t)
	data := random(t, 1<<20)
	got := readN(server, len(data))
	before, _ := cc.count()
	if _, err := wire.WriteBatched(b, client, data); err != nil {
		t.Fatal(err)
	}
	n, largest := cc.count()
	// Records of up to 16 KiB plus framing: three or more per batch.
	if n-before < 16 || n-before > 24 || largest > 64<<10 {
		t.Fatalf("1 MiB went out in %d writes, the largest %d bytes; want 16-24 of at most 64 KiB", n-before, largest)
	}
	if g := <-got; !bytes.Equal(g, data) {
		t.Fatalf("server read %d bytes, not what was sent", len(g))
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if k, err := server.Read(make([]byte, 1)); k != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("after close_notify: read %d, %v; want EOF", k, err)
	}
}

// Concurrent Writes each arrive whole (tls holds one Write's records
// together; the batch must not interleave them).
func TestBatchConcurrentWrites(t *testing.T) {
	client, b, _, server := batchedPair(t)
	a, c := bytes.Repeat([]byte{'a'}, 300<<10), bytes.Repeat([]byte{'c'}, 300<<10)
	got := readN(server, len(a)+len(c))
	var wg sync.WaitGroup
	for _, d := range [][]byte{a, c} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := wire.WriteBatched(b, client, d); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	g := <-got
	if !bytes.Equal(g, append(append([]byte(nil), a...), c...)) && !bytes.Equal(g, append(append([]byte(nil), c...), a...)) {
		t.Fatalf("got %d bytes, not one Write after the other", len(g))
	}
}

// A failed write(2) fails that Write (no byte counts as sent) and every
// write after it, batched or not.
func TestBatchErrorIsFinal(t *testing.T) {
	client, b, cc, _ := batchedPair(t)
	boom := errors.New("boom")
	cc.mu.Lock()
	cc.fail = boom
	cc.mu.Unlock()
	if n, err := wire.WriteBatched(b, client, []byte("hello")); n != 0 || !errors.Is(err, boom) {
		t.Fatalf("WriteBatched = %d, %v; want 0, boom", n, err)
	}
	cc.mu.Lock()
	cc.fail = nil // the connection works again; the batch must not
	cc.mu.Unlock()
	if _, err := wire.WriteBatched(b, client, []byte("again")); !errors.Is(err, boom) {
		t.Fatalf("second WriteBatched: %v, want boom", err)
	}
	if _, err := b.Write([]byte("raw")); !errors.Is(err, boom) {
		t.Fatalf("unbatched write: %v, want boom", err)
	}
}
