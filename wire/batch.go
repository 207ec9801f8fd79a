package wire

import (
	"io"
	"net"
	"sync"
)

// maxBatch bounds what a batch holds before it is written out: a big Write
// still goes out in pieces of about this size as it is encrypted.
const maxBatch = 64 << 10

// Batcher sits between a tls.Conn and its TCP connection. While a
// Write of the Conn is under way (Begin..End), the TLS records that Write
// produces are collected and go out together in one write(2): a 32 KiB
// Write is two 16 KiB records, and each write(2) costs a syscall, a TCP
// segment and a wake-up of the reader (on loopback, also the receiver's
// TCP input, run in the writer's context). Anything tls writes on its own
// between Writes (alerts, close_notify, key updates) goes straight through;
// if it comes during a Write it joins that Write's batch.
//
// A failed write(2) is final: every later write returns the same error, as
// tls.Conn does for its own writes (part of a record may be on the wire).
type Batcher struct {
	net.Conn // the TCP connection

	mu     sync.Mutex
	active int // Writes under way
	buf    []byte
	err    error
}

func (b *Batcher) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return 0, b.err
	}
	if b.active == 0 || len(b.buf)+len(p) > maxBatch {
		if err := b.flushLocked(); err != nil {
			return 0, err
		}
	}
	if b.active == 0 || len(p) > maxBatch {
		return b.write(p)
	}
	b.buf = append(b.buf, p...)
	return len(p), nil
}

func (b *Batcher) write(p []byte) (int, error) {
	n, err := b.Conn.Write(p)
	if err != nil {
		b.err = err
	}
	return n, err
}

func (b *Batcher) flushLocked() error {
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.write(b.buf)
	b.buf = b.buf[:0]
	return err
}

// NewBatcher returns a Batcher over c (the TCP connection a tls.Conn is
// made over).
func NewBatcher(c net.Conn) *Batcher { return &Batcher{Conn: c} }

// Begin opens a batch: until End, writes are collected.
func (b *Batcher) Begin() {
	b.mu.Lock()
	b.active++
	b.mu.Unlock()
}

// End closes a batch and writes out what it collected.
func (b *Batcher) End() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.active--
	if b.err != nil {
		return b.err
	}
	return b.flushLocked()
}

// WriteBatched writes p to w (the tls.Conn over b) as one batch of b. If
// the batch's write(2) fails, no byte of p counts as sent. A nil b is a
// plain write.
func WriteBatched(b *Batcher, w io.Writer, p []byte) (int, error) {
	if b == nil {
		return w.Write(p)
	}
	b.Begin()
	n, err := w.Write(p)
	if ferr := b.End(); ferr != nil && err == nil {
		return 0, ferr
	}
	return n, err
}
