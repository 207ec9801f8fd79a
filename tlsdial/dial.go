package tlsdial

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/attach-agent/attach-agent/wire"
)

// Defaults for Config. Each is what a zero field means.
const (
	DefaultConnectTimeout   = 5 * time.Second
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 30 * time.Second
	DefaultPairTimeout      = 60 * time.Second
	DefaultBackoffInitial   = 100 * time.Millisecond
	DefaultBackoffMax       = 2 * time.Second
	DefaultSlowHandshake    = 2 * time.Second
	DefaultKeepAlive        = 15 * time.Second
)

// Config says how to reach the relay. The zero value is usable: every zero
// duration means the matching Default above.
type Config struct {
	// TLS is the base client configuration (roots, client certificate). It
	// is cloned; ServerName is set from the URL host when empty and
	// MinVersion is raised to TLS 1.2. Nil means system roots.
	TLS *tls.Config `json:"-"`
	// Plain dials TCP without TLS (a relay behind a TLS-terminating
	// balancer, or tests). Off by default.
	Plain bool

	ConnectTimeout   time.Duration // one TCP connect attempt; zero: DefaultConnectTimeout
	HandshakeTimeout time.Duration // one TLS handshake; zero: DefaultHandshakeTimeout
	DialTimeout      time.Duration // all attempts together, back-off included; zero: DefaultDialTimeout
	PairTimeout      time.Duration // from sending the secret to the ack; zero: DefaultPairTimeout
	BackoffInitial   time.Duration // first pause between attempts; zero: DefaultBackoffInitial
	BackoffMax       time.Duration // longest pause; zero: DefaultBackoffMax
	SlowHandshake    time.Duration // Timings.Slow threshold for connect+TLS; zero: DefaultSlowHandshake
	KeepAlive        time.Duration // TCP keep-alive period; zero: DefaultKeepAlive, negative: off

	// Control, when set, is called on each socket before it connects, to
	// set options (buffer sizes, marks). See net.Dialer.Control.
	Control func(network, address string, c syscall.RawConn) error `json:"-"`
}

// DefaultConfig returns a Config with every field at its default.
func DefaultConfig() Config {
	return Config{
		ConnectTimeout:   DefaultConnectTimeout,
		HandshakeTimeout: DefaultHandshakeTimeout,
		DialTimeout:      DefaultDialTimeout,
		PairTimeout:      DefaultPairTimeout,
		BackoffInitial:   DefaultBackoffInitial,
		BackoffMax:       DefaultBackoffMax,
		SlowHandshake:    DefaultSlowHandshake,
		KeepAlive:        DefaultKeepAlive,
	}
}

// Validate reports a field that cannot work.
func (c Config) Validate() error {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{
		{"connect timeout", c.ConnectTimeout}, {"handshake timeout", c.HandshakeTimeout},
		{"dial timeout", c.DialTimeout}, {"pair timeout", c.PairTimeout},
		{"back-off initial", c.BackoffInitial}, {"back-off max", c.BackoffMax},
		{"slow handshake threshold", c.SlowHandshake},
	} {
		if f.d < 0 {
			return fmt.Errorf("%s is negative (%v): use a positive duration, or zero for the default", f.name, f.d)
		}
	}
	if c.BackoffMax != 0 && c.BackoffInitial > c.BackoffMax {
		return fmt.Errorf("back-off initial %v is above back-off max %v", c.BackoffInitial, c.BackoffMax)
	}
	return nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func (c Config) withDefaults() Config {
	c.ConnectTimeout = orDefault(c.ConnectTimeout, DefaultConnectTimeout)
	c.HandshakeTimeout = orDefault(c.HandshakeTimeout, DefaultHandshakeTimeout)
	c.DialTimeout = orDefault(c.DialTimeout, DefaultDialTimeout)
	c.PairTimeout = orDefault(c.PairTimeout, DefaultPairTimeout)
	c.BackoffInitial = orDefault(c.BackoffInitial, DefaultBackoffInitial)
	c.BackoffMax = orDefault(c.BackoffMax, DefaultBackoffMax)
	c.SlowHandshake = orDefault(c.SlowHandshake, DefaultSlowHandshake)
	c.KeepAlive = orDefault(c.KeepAlive, DefaultKeepAlive)
	return c
}

// Timings breaks a dial into its phases, so a slow client can be told from
// a slow network.
type Timings struct {
	Connect  time.Duration // TCP connect of the attempt that succeeded
	TLS      time.Duration // TLS handshake of that attempt
	Dial     time.Duration // all attempts, back-off included, until TLS was up
	Pair     time.Duration // secret sent until the ack was read
	Attempts int           // connect attempts made
	Resumed  bool          // the TLS session was resumed (Config.TLS.ClientSessionCache)
}

// Conn is a connection to the relay. After Pair it is a plain byte stream to
// the other side: nothing of the stream has been read into a hidden buffer.
type Conn struct {
	net.Conn          // *tls.Conn, or the TCP conn with Config.Plain
	Raw      net.Conn // the TCP connection under TLS
	Timings  Timings
	slow     time.Duration
	batch    *wire.Batcher // under TLS; nil with Config.Plain
}

// Write sends p; over TLS the records of one Write leave in one write(2)
// (see wire.Batcher), with the same deadlines and errors as the TLS
// connection's. If that write fails, no byte of p counts as sent.
func (c *Conn) Write(p []byte) (int, error) { return wire.WriteBatched(c.batch, c.Conn, p) }

// Slow reports whether connect plus TLS took longer than the configured
// threshold; callers log the Timings breakdown when it does.
func (c *Conn) Slow() bool { return c.Timings.Connect+c.Timings.TLS > c.slow }

// CloseWrite ends our side of the stream (close_notify for TLS, FIN for
// plain TCP) while reads continue.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// DialError is a dial that gave up. Err is the last attempt's error.
type DialError struct {
	Addr      string
	Attempts  int
	Elapsed   time.Duration
	Permanent bool // not retried: certificate, protocol or address errors
	Err       error
}

func (e *DialError) Error() string {
	if e.Permanent {
		return fmt.Sprintf("dial relay %s: %v%s", e.Addr, e.Err, hint(e.Err))
	}
	return fmt.Sprintf("dial relay %s: gave up after %d attempts in %v: %v",
		e.Addr, e.Attempts, e.Elapsed.Round(time.Millisecond), e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

func hint(err error) string {
	var ua x509.UnknownAuthorityError
	var cv *tls.CertificateVerificationError
	var he x509.HostnameError
	switch {
	case errors.As(err, &ua), errors.As(err, &cv) && errors.As(cv.Err, &ua):
		return " (pass the relay's CA bundle with --ca)"
	case errors.As(err, &he):
		return " (the certificate does not name this host: use the host it was issued for)"
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return " (the relay does not speak TLS here: is it in plain mode?)"
	}
	return ""
}

// Dial connects to the relay and completes TLS, retrying transient failures
// (refused, reset, timeouts, EOF during the handshake) with jittered
// exponential back-off until Config.DialTimeout or ctx ends. Certificate and
// protocol errors fail at once.
func Dial(ctx context.Context, u URL, cfg Config) (*Conn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer cancel()

	tcfg := clientTLS(cfg.TLS, u.Host)
	backoff := cfg.BackoffInitial
	attempts := 0
	var lastErr error
	for {
		attempts++
		offered := offersSession(tcfg)
		c, err := dialOnce(ctx, u, cfg, tcfg)
		if err == nil {
			c.Timings.Attempts = attempts
			c.Timings.Dial = time.Since(start)
			c.slow = cfg.SlowHandshake
			return c, nil
		}
		if ctx.Err() != nil && lastErr != nil {
			// Our own deadline cut this attempt short: the reason worth
			// reporting is what the attempts before it met (refused, reset).
			err = lastErr
		}
		lastErr = err
		if !transient(err) && offered {
			// The session it offered may be why (crypto/tls drops it then
			// too): once more, at once, with a full handshake.
			forgetSession(tcfg)
			continue
		}
		if !transient(err) {
			return nil, &DialError{Addr: u.Addr(), Attempts: attempts, Elapsed: time.Since(start), Permanent: true, Err: err}
		}
		// The pause is jittered (half fixed, half random) so a fleet does not
		// retry in step. When the deadline comes first, wait for it and give
		// up: an attempt squeezed into the last instant cannot succeed.
		pause := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, &DialError{Addr: u.Addr(), Attempts: attempts, Elapsed: time.Since(start), Err: err}
		case <-t.C:
		}
		backoff = min(backoff*2, cfg.BackoffMax)
	}
}

func clientTLS(base *tls.Config, host string) *tls.Config {
	var c *tls.Config
	if base != nil {
		c = base.Clone()
	} else {
		c = &tls.Config{}
	}
	if c.ServerName == "" {
		c.ServerName = host
	}
	if c.MinVersion < tls.VersionTLS12 {
		c.MinVersion = tls.VersionTLS12
	}
	return c
}

func dialOnce(ctx context.Context, u URL, cfg Config, tcfg *tls.Config) (*Conn, error) {
	d := net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: cfg.KeepAlive, Control: cfg.Control}
	t0 := time.Now()
	raw, err := d.DialContext(ctx, "tcp", u.Addr())
	if err != nil {
		return nil, err
	}
	c := &Conn{Conn: raw, Raw: raw}
	c.Timings.Connect = time.Since(t0)
	if cfg.Plain {
		return c, nil
	}
	t1 := time.Now()
	hctx, cancel := context.WithTimeout(ctx, cfg.HandshakeTimeout)
	defer cancel()
	bw := wire.NewBatcher(raw)
	tc := tls.Client(bw, tcfg)
	if err := tc.HandshakeContext(hctx); err != nil {
		_ = raw.Close() // best effort: the attempt failed
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			err = fmt.Errorf("tls handshake: no answer in %v: %w", cfg.HandshakeTimeout, os.ErrDeadlineExceeded)
		}
		return nil, err
	}
	c.Conn, c.batch = tc, bw
	c.Timings.TLS = time.Since(t1)
	cs := tc.ConnectionState()
	c.Timings.Resumed = cs.DidResume
	if cs.Version < tls.VersionTLS13 {
		forgetSession(tcfg) // its state would be this connection's master secret (Tickets)
	}
	return c, nil
}

// transient reports whether another attempt may succeed.
func transient(err error) bool {
	var rh tls.RecordHeaderError
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var alert tls.AlertError
	var dns *net.DNSError
	switch {
	case errors.As(err, &rh), errors.As(err, &cv), errors.As(err, &ua), errors.As(err, &he),
		errors.As(err, &ci), errors.As(err, &alert):
		return false
	case errors.As(err, &dns):
		return dns.IsTemporary || dns.IsTimeout
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET),
		errors.Is(err, syscall.ECONNABORTED), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EPIPE),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
