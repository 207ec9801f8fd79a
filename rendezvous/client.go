package rendezvous

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// EOFByte is what the Heroku CLI sends when its stdin ends (Ctrl-D).
const EOFByte = 0x04

// Client is the user's end of a session: it pairs through the relay, then
// copies Stdin to the stream and the stream to Stdout, one goroutine each.
type Client struct {
	URL  tlsdial.URL
	Dial tlsdial.Config
	// EOFByte, when set, sends 0x04 at the end of Stdin and keeps the
	// stream open for the output, as the Heroku CLI does (an agent takes
	// its close as a hang-up); unset, it half-closes, which a session with
	// no in-band end of input (binary pipes, a raw pty) takes as EOF.
	EOFByte bool
	Stdin   io.Reader // nil: nothing to send (as an empty one)
	Stdout  io.Writer // nil: discard
}

// Result is how a client session ended.
type Result struct {
	// Status is the remote exit status from the marker line, when Found.
	Status int
	Found  bool
	// Sent and Received count bytes of the stream each way after the ack.
	Sent, Received int64
}

// Run pairs and copies until the stream from the relay ends. It returns
// after the output side ends; the input goroutine stops at its next Read,
// when it finds the connection closed (close Stdin to stop it sooner).
// A stream that ends in a reset or error is an error: the session did not
// end cleanly.
func (c *Client) Run(ctx context.Context) (Result, error) {
	var res Result
	conn, err := tlsdial.Dial(ctx, c.URL, c.Dial)
	if err != nil {
		return res, err
	}
	defer func() { _ = conn.Close() }() // best effort
	if err := conn.Pair(ctx, c.URL.Secret, c.Dial.PairTimeout); err != nil {
		return res, err
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()

	var wg sync.WaitGroup
	var sent int64
	var sendErr error
	if c.Stdin != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sent, sendErr = c.send(conn, c.Stdin)
		}()
	} else {
		_, _ = c.send(conn, eofReader{}) // best effort: nothing to send but its end
	}

	out := c.Stdout
	if out == nil {
		out = io.Discard
	}
	filter := &wire.StatusFilter{W: out}
	cw := &countWriter{w: filter}
	_, recvErr := io.Copy(cw, conn)
	if ferr := filter.Flush(); ferr != nil && recvErr == nil {
		recvErr = ferr
	}
	res.Received = cw.n
	res.Status, res.Found = filter.Status, filter.Found
	if recvErr != nil {
		_ = conn.Close() // unblock the sender
		wg.Wait()
		res.Sent = sent
		if ctx.Err() != nil {
			return res, context.Cause(ctx)
		}
		return res, fmt.Errorf("relay -> stdout: %w", recvErr)
	}
	// Output is over. Close so a sender blocked on a full socket returns;
	// a sender blocked reading a terminal returns at its next Read.
	if c.Stdin != nil && !blocksForever(c.Stdin) {
		wg.Wait()
	}
	res.Sent = sent
	if sendErr != nil && !errors.Is(sendErr, net.ErrClosed) {
		return res, sendErr
	}
	return res, nil
}

// blocksForever reports readers (terminals, pipes) whose Read cannot be
// interrupted from here; Run does not wait for their goroutine.
func blocksForever(r io.Reader) bool {
	_, ok := r.(interface{ Fd() uintptr })
	return ok
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

func (c *Client) send(conn *tlsdial.Conn, in io.Reader) (int64, error) {
	n, err := io.Copy(conn, in)
	if err != nil {
		return n, fmt.Errorf("stdin -> relay: %w", err)
	}
	if c.EOFByte {
		if _, err := conn.Write([]byte{EOFByte}); err != nil {
			return n, fmt.Errorf("stdin -> relay: eof byte: %w", err)
		}
		return n, nil
	}
	if err := conn.CloseWrite(); err != nil {
		return n, fmt.Errorf("stdin -> relay: close write: %w", err)
	}
	return n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
