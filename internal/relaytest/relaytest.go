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
