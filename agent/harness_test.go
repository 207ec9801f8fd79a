package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

func TestMain(m *testing.M) {
	container.Main() // this binary is re-executed as the sandbox init
	leakcheck.Main(m)
}

// harness is a real relay on loopback TLS that sessions and clients meet at.
type harness struct {
	relay *rendezvous.Relay
	port  int
	dial  tlsdial.Config
	n     atomic.Int64
}

func newHarness(t testing.TB, r *rendezvous.Relay) *harness {
	t.Helper()
	e := relaytest.Start(t, r)
	return &harness{relay: e.Relay, port: e.Port, dial: e.Dial}
}

func (h *harness) url() tlsdial.URL {
	return tlsdial.URL{Host: "127.0.0.1", Port: h.port, Secret: fmt.Sprintf("secret-%d-%d", os.Getpid(), h.n.Add(1))}
}

// session starts agent.Run for spec (URL and Dial filled in when empty)
// and returns its URL and a channel with its result. The test waits for
// the result before it ends.
func (h *harness) session(t testing.TB, spec agent.Spec) (tlsdial.URL, <-chan agent.Result) {
	t.Helper()
	if spec.URL.Secret == "" {
		spec.URL = h.url()
	}
	if spec.Dial.TLS == nil && !spec.Dial.Plain {
		spec.Dial = h.dial
	}
	res := make(chan agent.Result, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		res <- agent.Run(context.Background(), spec, slog.New(slog.DiscardHandler))
	}()
	t.Cleanup(wg.Wait)
	return spec.URL, res
}

// client dials and pairs as the user's side.
func (h *harness) client(t testing.TB, u tlsdial.URL) *tlsdial.Conn {
	t.Helper()
	c, err := tlsdial.Dial(context.Background(), u, h.dial)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Pair(context.Background(), u.Secret, 30*time.Second); err != nil {
		_ = c.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(60 * time.Second)) // watchdog for every read and write
	return c
}

func wait(t testing.TB, res <-chan agent.Result, within time.Duration) agent.Result {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(within):
		t.Fatalf("session did not end within %v", within)
		return agent.Result{}
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// echo sends data and half-closes while it reads everything back.
func echo(c *tlsdial.Conn, data []byte) ([]byte, error) {
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(c)
	if e := <-werr; e != nil && err == nil {
		err = e
	}
	return got, err
}

func sum(b []byte) string { return fmt.Sprintf("%x", sha256.Sum256(b)) }

func sh(script string) []string { return []string{"/bin/sh", "-c", script} }

func stripMarker(b []byte) ([]byte, int, bool) {
	var out bytes.Buffer
	f := &wire.StatusFilter{W: &out}
	_, _ = f.Write(b)
	_ = f.Flush()
	return out.Bytes(), f.Status, f.Found
}

var _ = ptyio.ReasonExited
