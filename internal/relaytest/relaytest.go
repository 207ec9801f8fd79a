// Package relaytest runs the project's own Rendezvous relay on loopback for
// tests: one helper instead of a copy in every package's tests.
package relaytest

import (
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// Env is a running relay and what a client needs to reach it.
type Env struct {
	Relay *rendezvous.Relay
	Port  int
	// Dial reaches the relay: its CA for TLS (or Plain), generous bounds.
	Dial tlsdial.Config
	// TLS is the client TLS configuration (nil for a Plain relay).
	TLS *tls.Config
}

// Start listens on 127.0.0.1 with r (nil: a zero Relay, TLS with a
// throwaway CA) and serves until the test ends, when it closes the relay
// and checks that Serve returned cleanly.
func Start(t testing.TB, r *rendezvous.Relay) *Env {
	t.Helper()
	if r == nil {
		r = &rendezvous.Relay{}
	}
	if err := r.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Serve() }()
	t.Cleanup(func() {
		_ = r.Close()
		if err := <-done; err != nil {
			t.Errorf("relay Serve: %v", err)
		}
	})
	e := &Env{Relay: r, Port: r.Addr().(*net.TCPAddr).Port}
	e.Dial = tlsdial.Config{Plain: r.Plain, DialTimeout: 10 * time.Second, PairTimeout: 30 * time.Second}
	if c := r.Certs(); c != nil {
		e.TLS = &tls.Config{RootCAs: c.CAPool}
		e.Dial.TLS = e.TLS
	}
	return e
}

// URL is the relay's attach URL for secret.
func (e *Env) URL(secret string) tlsdial.URL {
	return tlsdial.URL{Host: "127.0.0.1", Port: e.Port, Secret: secret}
}

// CAFile writes the relay's CA to a file in the test's temp dir (for --ca).
func (e *Env) CAFile(t testing.TB) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "relay-ca.pem")
	if err := os.WriteFile(f, e.Relay.CAPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// TCPPair is a connected loopback TCP pair, closed when the test ends: a
// buffered, real stream (never a bare net.Pipe, which has no buffer and no
// half-close). The dialed side, a, has a 30 s deadline as a watchdog.
func TCPPair(t testing.TB) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { _ = c.Close(); _ = s.Close() })
	_ = c.SetDeadline(time.Now().Add(30 * time.Second)) // watchdog
	return c.(*net.TCPConn), s.(*net.TCPConn)
}
