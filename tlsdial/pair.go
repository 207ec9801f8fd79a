package tlsdial

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/wire"
)

// maxAckLine bounds what Pair reads while looking for the ack; anything
// longer is not a relay talking.
const maxAckLine = 256

// maxEmptyReads bounds reads that return neither bytes nor an error.
const maxEmptyReads = 100

// ErrPairTimeout means nobody else showed up with the secret in time.
var ErrPairTimeout = errors.New("no client paired in time")

// PairError is a pairing that failed after the connection was up.
type PairError struct {
	Waited time.Duration
	Err    error
}

func (e *PairError) Error() string {
	return fmt.Sprintf("pair: after %v: %v", e.Waited.Round(time.Millisecond), e.Err)
}
func (e *PairError) Unwrap() error { return e.Err }

// Pair writes the secret and a line end, then reads exactly through the
// relay's acknowledgement, one byte at a time, so not one byte past it is
// taken from the stream (the Heroku CLI drops its whole first read; the
// payload behind our ack belongs to the pump). It waits up to
// Config.PairTimeout (zero: DefaultPairTimeout) or until ctx ends. On return
// the connection has no deadline set.
func (c *Conn) Pair(ctx context.Context, secret string, timeout time.Duration) error {
	timeout = orDefault(timeout, DefaultPairTimeout)
	t0 := time.Now()
	defer func() { c.Timings.Pair = time.Since(t0) }()

	deadline := t0.Add(timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	if err := c.Conn.SetDeadline(deadline); err != nil {
		return &PairError{Err: err}
	}
	// Cancel by deadline on the thing that blocks: ctx cancellation moves
	// the deadline into the past, which ends the blocked Read or Write. It
	// is armed after the deadline above is set: for a ctx already done its
	// func runs at once, in a goroutine of its own, and the pair deadline
	// must not overwrite it. On return it has finished before the deadline
	// is cleared, so no past deadline is left on the stream the pump takes.
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = c.Conn.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	defer func() {
		if !stop() {
			<-fired
		}
		_ = c.Conn.SetDeadline(time.Time{}) // best effort: conn may be closed
	}()

	fail := func(err error) error {
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			err = ErrPairTimeout
		}
		return &PairError{Waited: time.Since(t0), Err: err}
	}
	if _, err := io.WriteString(c.Conn, secret+"\r\n"); err != nil {
		if isReset(err) {
			return fail(closedBeforePairing(err))
		}
		return fail(fmt.Errorf("send secret: %w", err))
	}
	var line []byte
	var b [1]byte
	empty := 0
	for len(line) < maxAckLine {
		n, err := c.Conn.Read(b[:])
		if n == 1 {
			line = append(line, b[0])
			if b[0] == '\n' {
				break
			}
			continue
		}
		if err == nil {
			// A read with no progress must not be retried in a tight loop
			// (the close_notify busy-loop incident): allow a few, then fail.
			if empty++; empty > maxEmptyReads {
				return fail(errors.New("relay stream makes no progress (repeated empty reads)"))
			}
			continue
		}
		switch {
		case len(line) == 0 && (errors.Is(err, io.EOF) || isReset(err)):
			return fail(closedBeforePairing(err))
		case errors.Is(err, io.EOF):
			return fail(fmt.Errorf("relay closed the connection after %s", quoteLine(line)))
		}
		return fail(err)
	}
	if string(line) == wire.Ack || string(line) == "rendezvous\n" {
		return nil
	}
	return fail(fmt.Errorf("relay answered %s, not the ack %q", quoteLine(line), wire.Ack))
}

// closedBeforePairing is the relay ending the connection before its ack:
// with a FIN (io.EOF, nothing more to say) or a reset (the error kept).
func closedBeforePairing(err error) error {
	const msg = "relay closed the connection before pairing (secret refused or expired, or the secret came after " +
		"the relay's first-line timeout, which a relay under load can cause: try again)"
	if errors.Is(err, io.EOF) {
		return errors.New(msg)
	}
	return fmt.Errorf("%s: %w", msg, err)
}

// isReset: the peer has reset or closed the connection under a write.
func isReset(err error) bool {
	return errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

func quoteLine(b []byte) string {
	if len(b) > 80 {
		return strconv.Quote(string(b[:80])) + "..."
	}
	return strconv.Quote(string(b))
}
