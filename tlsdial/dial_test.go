package tlsdial_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

// fakeRelay serves TLS on loopback and runs fn for each connection.
func fakeRelay(t testing.TB, fn func(c net.Conn)) (tlsdial.URL, *tls.Config) {
	t.Helper()
	return fakeRelayWith(t, nil, fn)
}

// fakeRelayWith is fakeRelay with edit applied to the server's TLS
// settings (nil: none).
func fakeRelayWith(t testing.TB, edit func(*tls.Config), fn func(c net.Conn)) (tlsdial.URL, *tls.Config) {
	t.Helper()
	certs, err := rendezvous.NewSelfSignedCerts(rendezvous.DefaultHosts)
	if err != nil {
		t.Fatal(err)
	}
	srv := &tls.Config{Certificates: []tls.Certificate{certs.Server}}
	if edit != nil {
		edit(srv)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srv)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				fn(c)
			}()
		}
	}()
	return urlFor(t, ln.Addr(), "s3cret"), &tls.Config{RootCAs: certs.CAPool}
}

func urlFor(t testing.TB, a net.Addr, secret string) tlsdial.URL {
	t.Helper()
	ta := a.(*net.TCPAddr)
	return tlsdial.URL{Host: ta.IP.String(), Port: ta.Port, Secret: secret}
}

func TestPairLeavesPayloadBehindAckInStream(t *testing.T) {
	for _, ack := range []string{"rendezvous\r\n", "rendezvous\n"} {
		u, tcfg := fakeRelay(t, func(c net.Conn) {
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil || line != "s3cret\r\n" {
				t.Errorf("relay got first line %q, %v", line, err)
				return
			}
			// Ack and payload in one Write: one TLS record.
			if _, err := io.WriteString(c, ack+"PAYLOAD after ack"); err != nil {
				t.Error(err)
			}
		})
		ctx := context.Background()
		c, err := tlsdial.Dial(ctx, u, tlsdial.Config{TLS: tcfg})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Pair(ctx, u.Secret, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != "PAYLOAD after ack" {
			t.Errorf("ack %q: read after Pair = %q, want the payload that shared the ack's record", ack, got)
		}
		_ = c.Close()
	}
}

func TestPairRejectsOtherAnswers(t *testing.T) {
	u, tcfg := fakeRelay(t, func(c net.Conn) {
		_, _ = bufio.NewReader(c).ReadString('\n')
		_, _ = io.WriteString(c, "rendezvous: secret is already paired\r\n")
	})
	ctx := context.Background()
	c, err := tlsdial.Dial(ctx, u, tlsdial.Config{TLS: tcfg})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Pair(ctx, u.Secret, 5*time.Second)
	if err == nil || !strings.Contains(err.Error(), "already paired") {
		t.Fatalf("Pair = %v, want the relay's refusal in the error", err)
	}
}

func TestPairTimeoutAndCancel(t *testing.T) {
	var relay rendezvous.Relay
	u, tcfg := startRelay(t, &relay)

	c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: tcfg})
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	err = c.Pair(context.Background(), u.Secret, 300*time.Millisecond)
	_ = c.Close()
	if !errors.Is(err, tlsdial.ErrPairTimeout) {
		t.Fatalf("Pair with nobody else = %v, want ErrPairTimeout", err)
	}
	if time.Since(t0) < 300*time.Millisecond {
		t.Fatalf("Pair gave up after %v, before its 300ms timeout", time.Since(t0))
	}

	u.Secret = "another"
	c, err = tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: tcfg})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithCancelCause(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Pair(ctx, u.Secret, time.Minute) }()
	cancel(errors.New("operator gave up"))
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), "operator gave up") {
			t.Fatalf("cancelled Pair = %v, want the cancel cause", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Pair did not return after its context was cancelled")
	}
}

// TestPairCancelledBeforeStart: a ctx that is already done ends Pair at
// once, every time. Its cancel func runs in a goroutine of its own as soon
// as it is armed; once, it ran before Pair had set its own deadline, which
// then overwrote the cancel's, and Pair waited out its whole timeout (CI,
// tlsdial). Repeated, so the two orders both come up.
func TestPairCancelledBeforeStart(t *testing.T) {
	var relay rendezvous.Relay
	u, tcfg := startRelay(t, &relay)
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(errors.New("session deleted"))
	const rounds = 200
	for i := range rounds {
		u.Secret = fmt.Sprintf("cancelled-%d", i)
		c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: tcfg})
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() { errc <- c.Pair(ctx, u.Secret, time.Minute) }()
		select {
		case err := <-errc:
			if err == nil || !strings.Contains(err.Error(), "session deleted") {
				t.Fatalf("round %d: Pair on a done ctx = %v, want the cancel cause", i, err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d of %d: Pair on a done ctx still waits after 10s (its timeout is 1m)", i, rounds)
		}
		_ = c.Close()
	}
}

func startRelay(t *testing.T, r *rendezvous.Relay) (tlsdial.URL, *tls.Config) {
	t.Helper()
	e := relaytest.Start(t, r)
	return e.URL("s3cret"), e.TLS
}

// freePort returns a loopback port nothing listens on (yet).
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	return p
}

func TestDialRetriesUntilRelayComesUp(t *testing.T) {
	port := freePort(t)
	certs, err := rendezvous.NewSelfSignedCerts(rendezvous.DefaultHosts)
	if err != nil {
		t.Fatal(err)
	}
	relay := &rendezvous.Relay{TLSConfig: &tls.Config{Certificates: []tls.Certificate{certs.Server}}}
	u := tlsdial.URL{Host: "127.0.0.1", Port: port, Secret: "s"}
	type result struct {
		c   *tlsdial.Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{
			TLS: &tls.Config{RootCAs: certs.CAPool}, DialTimeout: 20 * time.Second, BackoffMax: 200 * time.Millisecond,
		})
		res <- result{c, err}
	}()
	// The relay is down for the first part of the dial window (the scenario
	// itself, not synchronisation), then comes up on the same port.
	time.Sleep(800 * time.Millisecond)
	if err := relay.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- relay.Serve() }()
	defer func() { _ = relay.Close(); <-done }()

	r := <-res
	if r.err != nil {
		t.Fatalf("Dial while the relay came up: %v", r.err)
	}
	defer r.c.Close()
	if r.c.Timings.Attempts < 2 {
		t.Errorf("Attempts = %d, want retries while the relay was down", r.c.Timings.Attempts)
	}
	if r.c.Timings.Dial < 800*time.Millisecond || r.c.Timings.TLS <= 0 || r.c.Timings.Connect <= 0 {
		t.Errorf("timings %+v do not add up", r.c.Timings)
	}
}

func TestDialGivesUpAtDeadline(t *testing.T) {
	u := tlsdial.URL{Host: "127.0.0.1", Port: freePort(t), Secret: "s"}
	t0 := time.Now()
	_, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{DialTimeout: time.Second, BackoffMax: 100 * time.Millisecond})
	elapsed := time.Since(t0)
	var de *tlsdial.DialError
	if !errors.As(err, &de) {
		t.Fatalf("Dial to a closed port = %v, want a DialError", err)
	}
	if de.Permanent || de.Attempts < 3 {
		t.Errorf("DialError %+v: want several transient attempts", de)
	}
	if elapsed < 900*time.Millisecond || elapsed > 10*time.Second {
		t.Errorf("gave up after %v, want at its 1s deadline", elapsed)
	}
	for _, want := range []string{"dial relay 127.0.0.1:", "gave up after", "attempts", "connection refused"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

func TestDialWrongCAFailsAtOnce(t *testing.T) {
	var relay rendezvous.Relay
	u, _ := startRelay(t, &relay)
	other, err := rendezvous.NewSelfSignedCerts(rendezvous.DefaultHosts)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err = tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: &tls.Config{RootCAs: other.CAPool}})
	var de *tlsdial.DialError
	if !errors.As(err, &de) || !de.Permanent || de.Attempts != 1 {
		t.Fatalf("Dial with the wrong CA = %v (%+v), want one permanent attempt", err, de)
	}
	if !strings.Contains(err.Error(), "unknown authority") || !strings.Contains(err.Error(), "--ca") {
		t.Errorf("error %q should name the problem and the --ca way out", err)
	}
	if time.Since(t0) > 5*time.Second {
		t.Errorf("wrong CA took %v to fail, want at once", time.Since(t0))
	}
}

func TestDialPlainServerIsProtocolError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer func() { _ = ln.Close(); wg.Wait() }()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, "HTTP/1.0 400 Bad Request\r\n\r\n")
			_ = c.Close()
		}
	}()
	_, err = tlsdial.Dial(context.Background(), urlFor(t, ln.Addr(), "s"), tlsdial.Config{})
	var de *tlsdial.DialError
	if !errors.As(err, &de) || !de.Permanent || de.Attempts != 1 {
		t.Fatalf("Dial to a non-TLS server = %v, want one permanent attempt", err)
	}
	if !strings.Contains(err.Error(), "does not speak TLS") {
		t.Errorf("error %q should say the relay does not speak TLS", err)
	}
}

func TestDialHandshakeTimeout(t *testing.T) {
	// A server that accepts TCP and never answers the TLS hello.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	defer func() {
		_ = ln.Close()
		wg.Wait()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	_, err = tlsdial.Dial(context.Background(), urlFor(t, ln.Addr(), "s"), tlsdial.Config{
		HandshakeTimeout: 200 * time.Millisecond, DialTimeout: 1500 * time.Millisecond,
	})
	var de *tlsdial.DialError
	if !errors.As(err, &de) || de.Permanent || de.Attempts < 2 {
		t.Fatalf("Dial to a silent server = %v (%+v), want retried handshake timeouts", err, de)
	}
	if !strings.Contains(err.Error(), "no answer in 200ms") {
		t.Errorf("error %q should name the handshake timeout", err)
	}
}

func TestSlowHandshakeReported(t *testing.T) {
	var relay rendezvous.Relay
	u, tcfg := startRelay(t, &relay)
	c, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: tcfg, SlowHandshake: time.Nanosecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.Slow() {
		t.Errorf("Slow() = false with a 1ns threshold (timings %+v)", c.Timings)
	}
	c2, err := tlsdial.Dial(context.Background(), u, tlsdial.Config{TLS: tcfg, SlowHandshake: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if c2.Slow() {
		t.Errorf("Slow() = true with a 1h threshold")
	}
}

func TestConfigValidate(t *testing.T) {
	if err := tlsdial.DefaultConfig().Validate(); err != nil {
		t.Fatalf("DefaultConfig: %v", err)
	}
	if err := (tlsdial.Config{}).Validate(); err != nil {
		t.Fatalf("zero Config: %v", err)
	}
	err := tlsdial.Config{PairTimeout: -time.Second}.Validate()
	if err == nil || !strings.Contains(err.Error(), "pair timeout is negative") {
		t.Fatalf("negative pair timeout: %v", err)
	}
	err = tlsdial.Config{BackoffInitial: time.Minute, BackoffMax: time.Second}.Validate()
	if err == nil || !strings.Contains(err.Error(), "back-off initial") {
		t.Fatalf("initial above max: %v", err)
	}
}
