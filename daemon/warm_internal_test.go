package daemon

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

// A spare's warm-up runs the real paths, not a failure taken for one: the
// made-up order passes specFor, and the dial to the relay in miniature
// pairs, over TLS and plain.
func TestWarmUpPathsSucceed(t *testing.T) {
	if err := warmOrder(DefaultConfig(), make([]byte, 32)); err != nil {
		t.Errorf("warmOrder: %v", err)
	}
	for _, dial := range []tlsdial.Config{
		{TLS: &tls.Config{MinVersion: tls.VersionTLS13}},
		{TLS: nil}, // system roots: the throwaway certificate replaces them
		{Plain: true},
	} {
		if err := warmDial(dial); err != nil {
			t.Errorf("warmDial (plain %v): %v", dial.Plain, err)
		}
	}
}

// Another local user who connects to a spare's miniature relay first is
// turned away at once, whatever it sends: the spare reads nothing from it
// (a line without an end would otherwise grow without bound in a root
// process), and still serves its own dial after it.
func TestWarmRelayServesOnlyItsOwnDial(t *testing.T) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var ownPort atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		serveWarm(ln, nil, func() int { return int(ownPort.Load()) }, time.Now().Add(5*time.Second))
	}()
	stranger, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	type wrote struct {
		n   int
		err error
	}
	strangerDone := make(chan wrote, 1)
	go func() {
		junk := make([]byte, 1<<20)
		_ = stranger.SetDeadline(time.Now().Add(5 * time.Second))
		var w wrote
		for w.n < 64<<20 && w.err == nil {
			var n int
			n, w.err = stranger.Write(junk)
			w.n += n
		}
		strangerDone <- w
	}()
	own, err := (&net.Dialer{Control: bindingSource(nil, &ownPort)}).Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	_ = own.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(own, warmSecret+"\r\n"); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, len(wire.Ack))
	if _, err := io.ReadFull(own, ack); err != nil || string(ack) != wire.Ack {
		t.Fatalf("own dial: %q, %v", ack, err)
	}
	<-done
	w := <-strangerDone
	if w.err == nil || errors.Is(w.err, os.ErrDeadlineExceeded) {
		t.Fatalf("the stranger wrote %d bytes and was not turned away (%v)", w.n, w.err)
	}
}
