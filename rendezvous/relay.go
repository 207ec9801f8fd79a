// Package rendezvous is a minimal but correct Rendezvous relay and client:
// two parties that cannot reach each other dial out to the relay, each sends
// the same secret as its first line, and the relay splices them into one
// bidirectional stream. It exists so the whole attach path runs on one
// machine for tests, demos and benchmarks, and it speaks the wire the way
// the Heroku CLI expects (see shared PROTOCOL.md).
package rendezvous

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/wire"
)

// Defaults for Relay. Each is what a zero field means.
const (
	DefaultFirstLineTimeout = 10 * time.Second
	DefaultBareSecretWait   = 250 * time.Millisecond
	DefaultPairTimeout      = 2 * time.Minute
	DefaultMaxUnpaired      = 10000
	DefaultWriteTimeout     = 10 * time.Second
	// DefaultMaxConns bounds open connections in all; DefaultMaxConnsPerSource
	// and DefaultMaxUnpairedPerSource bound one source address's share, so
	// that no one address can lock real clients out. One worker host is
	// one address with up to its agent's --max-sessions (1000) sessions,
	// each waiting to pair for a while: the per-source caps leave room for
	// it, and it takes ten such addresses to fill MaxUnpaired.
	DefaultMaxConns             = 20000
	DefaultMaxConnsPerSource    = 4096
	DefaultMaxUnpairedPerSource = 1024
	// DefaultSpliceIdle ends a spliced pair that moved nothing either way
	// for this long: past the agent's longest idle timeout (24 h), since
	// the Heroku wire has no keepalive and an idle shell is no fault.
	// DefaultSpliceStall ends one that could not write to a side for this
	// long: longer than a command that reads its stdin late (sleep, then
	// cat) leaves piped input waiting.
	DefaultSpliceIdle  = 25 * time.Hour
	DefaultSpliceStall = 10 * time.Minute
	// maxEarly bounds what a waiting side may send before it is paired
	// (kept, and passed on after the acks): a line or two of typed input,
	// not a budget a flood of waiting sides could turn into gigabytes.
	maxEarly = 4 << 10
	// RecordSize is the largest TLS record payload; Coalesce fills records
	// to it the way some load balancers do.
	RecordSize = 16 << 10
	// batchSize bounds what one write to a side carries without Coalesce.
	batchSize = 64 << 10
	// coalesceFlush is how long Coalesce waits for more bytes before it
	// sends a partly filled record.
	coalesceFlush = 2 * time.Millisecond
)

// Relay pairs connections by secret and splices them. The zero value is a
// working TLS relay with a throwaway self-signed certificate (read CAPEM
// after Listen). Set fields before Listen; they are not changed after.
type Relay struct {
	// TLSConfig is the server configuration. Its first certificate is the
	// default, served to clients that send no SNI (the Heroku CLI sends
	// none). Nil (and not Plain): Listen makes a self-signed CA and
	// certificate for localhost, 127.0.0.1 and ::1.
	TLSConfig *tls.Config
	// Plain serves plain TCP, for running behind a TLS-terminating balancer.
	Plain bool

	FirstLineTimeout time.Duration // accept to the end of the secret line (TLS handshake included); zero: DefaultFirstLineTimeout
	BareSecretWait   time.Duration // quiet time that ends a secret sent without a line end; zero: DefaultBareSecretWait
	PairTimeout      time.Duration // how long one side waits for the other; zero: DefaultPairTimeout
	MaxUnpaired      int           // connections waiting for a partner; zero: DefaultMaxUnpaired
	WriteTimeout     time.Duration // writing the ack (and refusals); zero: DefaultWriteTimeout

	MaxConns             int // open connections in all; zero: DefaultMaxConns
	MaxConnsPerSource    int // open connections from one source address; zero: DefaultMaxConnsPerSource
	MaxUnpairedPerSource int // waiting connections from one source address; zero: DefaultMaxUnpairedPerSource
	// SpliceIdle ends a pair that moved nothing either way this long;
	// SpliceStall one whose write to a side made no progress this long (a
	// client that stopped reading). Zero: the defaults; negative: off.
	SpliceIdle, SpliceStall time.Duration

	// Coalesce packs spliced bytes into records of up to 16 KiB (waiting a
	// moment for a record to fill), like a load balancer that sends large
	// TLS records. For tests of the agent's pump.
	Coalesce bool
	// Fault, when set, is asked at each FaultEvent what to do. For tests.
	Fault func(FaultEvent) FaultAction
	// Logger receives one line per pairing and per refusal; the secret
	// appears only as a fingerprint. Nil: no logs.
	Logger *slog.Logger

	mu       sync.Mutex
	ln       net.Listener
	certs    *Certs
	slots    map[string]*slot
	unpaired int
	conns    map[net.Conn]string // -> source address
	bySource map[string]*sourceCount
	lastLog  map[string]time.Time // refusals logged per source, at most one a second
	closing  bool
	quit     chan struct{}
	wg       sync.WaitGroup

	stats Stats
}

// Stats counts what the relay did. Read it with Relay.Stats.
type Stats struct {
	Accepted, Paired, Refused, Unpaired, BadFirstLine atomic.Int64
	Spliced                                           atomic.Int64 // payload bytes written, both directions
	// Limited counts connections refused by a cap (MaxConns, per source).
	Limited atomic.Int64
}

// StatsSnapshot is a copy of Stats.
type StatsSnapshot struct {
	Accepted, Paired, Refused, Unpaired, BadFirstLine int64
	Spliced                                           int64
	Limited                                           int64
}

// FaultStage says where in a connection's life a FaultEvent happens.
type FaultStage int

const (
	FaultAccept FaultStage = iota // a connection was accepted, before TLS
	FaultPair                     // a pair formed, before the acks are written
	FaultData                     // a chunk is about to be spliced (Bytes: so far in that direction)
)

// FaultEvent describes the moment a fault hook is consulted.
type FaultEvent struct {
	Stage       FaultStage
	Fingerprint string // of the secret; empty at FaultAccept
	Bytes       int64
}

// FaultAction is what a fault hook asks for. The zero value does nothing.
type FaultAction struct {
	Delay time.Duration // pause first
	Drop  bool          // close the connection(s) quietly (FIN)
	Reset bool          // abort with a TCP reset
}

// sourceCount is one source address's connections.
type sourceCount struct{ open, unpaired int }

type slot struct {
	a, b     *side
	src      string        // a's source address
	claimed  chan struct{} // closed when b arrives
	released chan struct{} // closed when a's waiting read has stopped (early holds what it read)
	done     chan struct{} // closed when the splice is over
	early    []byte
}

type side struct {
	conn  net.Conn      // TLS or plain
	raw   net.Conn      // TCP under it
	batch *wire.Batcher // between the two with TLS
}

// Listen opens the relay's listening socket (network "tcp", address like
// "127.0.0.1:0"); Addr then tells where it is.
func (r *Relay) Listen(network, addr string) error {
	if !r.Plain && r.TLSConfig == nil {
		c, err := NewSelfSignedCerts(DefaultHosts)
		if err != nil {
			return err
		}
		r.certs = c
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return fmt.Errorf("relay: listen: %w", err)
	}
	r.mu.Lock()
	r.ln = ln
	r.mu.Unlock()
	return nil
}

// Addr is the listening address, or nil before Listen.
func (r *Relay) Addr() net.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln == nil {
		return nil
	}
	return r.ln.Addr()
}

// CAPEM is the self-signed CA made by Listen, or nil when the relay was
// given its own TLSConfig or is Plain.
func (r *Relay) CAPEM() []byte {
	if r.certs == nil {
		return nil
	}
	return r.certs.CAPEM
}

// Certs is what Listen generated, or nil.
func (r *Relay) Certs() *Certs { return r.certs }

// Stats returns the relay's counters.
func (r *Relay) Stats() StatsSnapshot {
	return StatsSnapshot{
		Accepted: r.stats.Accepted.Load(), Paired: r.stats.Paired.Load(), Refused: r.stats.Refused.Load(),
		Unpaired: r.stats.Unpaired.Load(), BadFirstLine: r.stats.BadFirstLine.Load(),
		Spliced: r.stats.Spliced.Load(), Limited: r.stats.Limited.Load(),
	}
}

// Waiting is how many connections wait for a partner now.
func (r *Relay) Waiting() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.unpaired
}

// ListenAndServe is Listen then Serve.
func (r *Relay) ListenAndServe(network, addr string) error {
	if err := r.Listen(network, addr); err != nil {
		return err
	}
	return r.Serve()
}

// Serve accepts connections until Shutdown or Close. It returns nil after
// those and the accept error otherwise.
func (r *Relay) Serve() error {
	r.mu.Lock()
	ln := r.ln
	if ln == nil {
		r.mu.Unlock()
		return errors.New("relay: Serve before Listen")
	}
	if r.quit == nil {
		r.quit = make(chan struct{})
	}
	r.mu.Unlock()
	tcfg := r.serverTLS()
	var backoff time.Duration
	for {
		raw, err := ln.Accept()
		if err != nil {
			r.mu.Lock()
			closing := r.closing
			r.mu.Unlock()
			if closing {
				return nil
			}
			// Out of fds and the like: wait a little instead of spinning.
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) || isTemporaryAccept(err) {
				backoff = min(max(backoff*2, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("relay: accept: %w", err)
		}
		backoff = 0
		src := sourceOf(raw)
		if why := r.track(raw, src); why != "" {
			_ = raw.Close() // best effort: refused before TLS, at no cost to us
			if why != "shutting down" {
				r.stats.Limited.Add(1)
				r.logRefusal(src, why)
			}
			continue
		}
		r.stats.Accepted.Add(1)
		go r.handle(raw, src, tcfg)
	}
}

func isTemporaryAccept(err error) bool {
	type temporary interface{ Temporary() bool }
	var t temporary
	return errors.As(err, &t) && t.Temporary()
}

func (r *Relay) serverTLS() *tls.Config {
	if r.Plain {
		return nil
	}
	var c *tls.Config
	if r.TLSConfig != nil {
		c = r.TLSConfig.Clone()
	} else {
		c = &tls.Config{Certificates: []tls.Certificate{r.certs.Server}}
	}
	if c.MinVersion < tls.VersionTLS12 {
		c.MinVersion = tls.VersionTLS12
	}
	return c
}

// track admits c from src, or says which cap refuses it.
func (r *Relay) track(c net.Conn, src string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return "shutting down"
	}
	if r.conns == nil {
		r.conns = make(map[net.Conn]string)
		r.bySource = make(map[string]*sourceCount)
	}
	sc := r.bySource[src]
	switch {
	case len(r.conns) >= orInt(r.MaxConns, DefaultMaxConns):
		return "too many open connections"
	case sc != nil && sc.open >= orInt(r.MaxConnsPerSource, DefaultMaxConnsPerSource):
		return "too many open connections from this address"
	case sc == nil:
		sc = &sourceCount{}
		r.bySource[src] = sc
	}
	sc.open++
	r.conns[c] = src
	r.wg.Add(1)
	return ""
}

func (r *Relay) untrack(c net.Conn) {
	r.mu.Lock()
	if src, ok := r.conns[c]; ok {
		delete(r.conns, c)
		if sc := r.bySource[src]; sc != nil {
			if sc.open--; sc.open <= 0 && sc.unpaired <= 0 {
				delete(r.bySource, src)
			}
		}
	}
	r.mu.Unlock()
	r.wg.Done()
}

// sourceOf is a connection's source address without its port; an IPv6
// address counts by its /64, which one host or user is routinely given
// whole.
func sourceOf(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		if a.IP.To4() == nil {
			return a.IP.Mask(net.CIDRMask(64, 128)).String() + "/64"
		}
		return a.IP.String()
	}
	return c.RemoteAddr().String()
}

// logRefusal logs a cap's refusal with its source (never a secret), at
// most once a second per source: a flood must not become one of logs.
func (r *Relay) logRefusal(src, why string) {
	r.mu.Lock()
	if r.lastLog == nil {
		r.lastLog = make(map[string]time.Time)
	}
	now := time.Now()
	if now.Sub(r.lastLog[src]) < time.Second {
		r.mu.Unlock()
		return
	}
	if len(r.lastLog) > 10000 {
		clear(r.lastLog) // bounded memory under a spread-out flood
	}
	r.lastLog[src] = now
	r.mu.Unlock()
	r.log().Warn("relay: refused connection", "source", src, "reason", why, "refused_total", r.stats.Limited.Load())
}

func (r *Relay) log() *slog.Logger {
	if r.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Logger
}

func (r *Relay) fault(ev FaultEvent) FaultAction {
	if r.Fault == nil {
		return FaultAction{}
	}
	a := r.Fault(ev)
	if a.Delay > 0 {
		time.Sleep(a.Delay)
	}
	return a
}

func abort(s *side, reset bool) {
	if reset {
		if tc, ok := s.raw.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // best effort: makes Close send RST
		}
	}
	_ = s.raw.Close() // best effort: ending it is the point
}

// handle runs one accepted connection: first line, then pairing. The
// goroutine of the second side of a pair runs the splice; the first waits.
func (r *Relay) handle(raw net.Conn, src string, tcfg *tls.Config) {
	defer r.untrack(raw)
	s := &side{conn: raw, raw: raw}
	firstLineBy := time.Now().Add(orDur(r.FirstLineTimeout, DefaultFirstLineTimeout)) // the handshake included
	// The client's handshake flight and its secret line, each small, must
	// not wait for our delayed ACK when it runs Nagle's algorithm.
	quickAck(raw)
	if a := r.fault(FaultEvent{Stage: FaultAccept}); a.Drop || a.Reset {
		abort(s, a.Reset)
		return
	}
	if tcfg != nil {
		s.batch = wire.NewBatcher(raw)
		s.conn = tls.Server(s.batch, tcfg)
	}
	if tc, ok := s.conn.(*tls.Conn); ok {
		_ = tc.SetDeadline(firstLineBy)
		if err := tc.Handshake(); err != nil {
			r.stats.BadFirstLine.Add(1)
			r.log().Info("relay: dropped connection", "remote", raw.RemoteAddr().String(), "err", err)
			_ = raw.Close() // best effort
			return
		}
		_ = tc.SetDeadline(time.Time{})
		quickAck(raw) // again: the kernel turns it off; the secret line comes next
	}
	secret, err := r.readFirstLine(s.conn, firstLineBy)
	if err != nil {
		r.stats.BadFirstLine.Add(1)
		r.log().Info("relay: dropped connection", "remote", raw.RemoteAddr().String(), "err", err)
		_ = s.conn.Close() // best effort
		return
	}
	fp := wire.Fingerprint(secret)

	r.mu.Lock()
	if r.slots == nil {
		r.slots = make(map[string]*slot)
	}
	sl := r.slots[secret]
	switch {
	case r.closing:
		r.mu.Unlock()
		r.refuse(s, fp, "relay is shutting down")
		return
	case sl == nil && r.unpaired >= orInt(r.MaxUnpaired, DefaultMaxUnpaired):
		r.mu.Unlock()
		r.refuse(s, fp, "too many connections waiting for a partner")
		return
	case sl == nil && r.bySource[src] != nil && r.bySource[src].unpaired >= orInt(r.MaxUnpairedPerSource, DefaultMaxUnpairedPerSource):
		r.mu.Unlock()
		r.stats.Limited.Add(1)
		r.logRefusal(src, "too many connections waiting for a partner from this address")
		r.refuse(s, fp, "too many connections waiting for a partner from your address")
		return
	case sl == nil:
		sl = &slot{a: s, src: src, claimed: make(chan struct{}), released: make(chan struct{}), done: make(chan struct{})}
		r.slots[secret] = sl
		r.unpaired++
		if sc := r.bySource[src]; sc != nil {
			sc.unpaired++
		}
		// Armed before a partner can claim it (under mu): the claim's
		// deadline in the past must not be overwritten by this one.
		_ = s.conn.SetReadDeadline(time.Now().Add(orDur(r.PairTimeout, DefaultPairTimeout)))
		r.mu.Unlock()
		r.wait(sl, secret, fp)
		return
	case sl.b != nil:
		r.mu.Unlock()
		r.refuse(s, fp, "secret is already paired")
		return
	}
	sl.b = s
	r.unpaired--
	if sc := r.bySource[sl.src]; sc != nil {
		sc.unpaired--
	}
	close(sl.claimed)
	r.mu.Unlock()
	// Stop the first side's waiting read (a deadline in the past); what it
	// read meanwhile is passed on after the acks.
	_ = sl.a.conn.SetReadDeadline(time.Unix(1, 0))
	<-sl.released

	defer func() {
		r.mu.Lock()
		delete(r.slots, secret)
		r.mu.Unlock()
		close(sl.done)
	}()
	r.pair(sl, fp)
}

// wait is the first side's part: it waits for a partner, the pair timeout
// or shutdown, reading its connection all the while, so that a side whose
// client has gone (EOF, reset) is freed at once and never paired. Bytes it
// sends before the pair (at most maxEarly) are kept for its partner. Once
// claimed, the partner's goroutine owns both connections and this one only
// waits for the splice to end.
func (r *Relay) wait(sl *slot, secret, fp string) {
	a := sl.a
	buf := make([]byte, 512)
	reason := ""
	for reason == "" {
		n, err := a.conn.Read(buf)
		sl.early = append(sl.early, buf[:n]...)
		select {
		case <-sl.claimed:
			close(sl.released)
			<-sl.done
			return
		default:
		}
		switch {
		case len(sl.early) > maxEarly:
			reason = fmt.Sprintf("sent more than %d bytes before a partner came", maxEarly)
		case err == nil:
		case errors.Is(err, os.ErrDeadlineExceeded) && r.isClosing():
			reason = "relay is shutting down"
		case errors.Is(err, os.ErrDeadlineExceeded):
			reason = "no partner arrived in time"
		default:
			reason = "it closed before a partner came"
		}
	}
	r.mu.Lock()
	if sl.b != nil { // claimed just as we gave up: the partner owns it now
		r.mu.Unlock()
		close(sl.released)
		<-sl.done
		return
	}
	delete(r.slots, secret)
	r.unpaired--
	if sc := r.bySource[sl.src]; sc != nil {
		sc.unpaired--
	}
	r.mu.Unlock()
	r.stats.Unpaired.Add(1)
	r.log().Info("relay: unpaired connection closed", "secret_fp", fp, "reason", reason)
	_ = a.conn.Close() // best effort
}

func (r *Relay) isClosing() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closing
}

func (r *Relay) refuse(s *side, fp, why string) {
	r.stats.Refused.Add(1)
	r.log().Info("relay: refused connection", "secret_fp", fp, "reason", why)
	_ = s.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = io.WriteString(s.conn, "rendezvous: "+why+"\r\n") // best effort: tell it why
	_ = s.conn.Close()                                       // best effort
}

// readFirstLine reads the secret: up to "\r\n" or "\n", or, for clients
// that send no terminator, whatever arrived before BareSecretWait of quiet.
// It reads one byte at a time so nothing behind the line is consumed. The
// line must be in by deadline (FirstLineTimeout from the accept).
func (r *Relay) readFirstLine(c net.Conn, deadline time.Time) (string, error) {
	bare := orDur(r.BareSecretWait, DefaultBareSecretWait)
	if err := c.SetReadDeadline(deadline); err != nil {
		return "", err
	}
	line := make([]byte, 0, 128)
	var b [1]byte
	empty := 0
	for {
		n, err := c.Read(b[:])
		if n == 1 {
			if b[0] == '\n' {
				break
			}
			line = append(line, b[0])
			if len(line) > wire.MaxSecretLen+1 {
				return "", fmt.Errorf("first line longer than %d bytes", wire.MaxSecretLen)
			}
			// After each byte, quiet for `bare` ends a secret with no line end.
			if err := c.SetReadDeadline(earliest(deadline, time.Now().Add(bare))); err != nil {
				return "", err
			}
			continue
		}
		if err == nil {
			if empty++; empty > 100 {
				return "", errors.New("no progress reading the first line")
			}
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && len(line) > 0 && time.Now().Before(deadline) {
			break // a bare secret
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return "", fmt.Errorf("no secret line within %v", orDur(r.FirstLineTimeout, DefaultFirstLineTimeout))
		}
		return "", fmt.Errorf("reading first line: %w", err)
	}
	if len(line) > 0 && line[len(line)-1] == '\r' {
		line = line[:len(line)-1]
	}
	if len(line) == 0 {
		return "", errors.New("empty secret")
	}
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		return "", err
	}
	return string(line), nil
}

// pair acknowledges both sides and splices them. Each ack is one Write, so
// one TLS record of its own, and both are complete before any payload moves:
// the Heroku CLI discards its whole first read, so payload must never share
// the ack's record.
func (r *Relay) pair(sl *slot, fp string) {
	a, b := sl.a, sl.b
	defer func() {
		_ = a.conn.Close() // best effort
		_ = b.conn.Close() // best effort
	}()
	if act := r.fault(FaultEvent{Stage: FaultPair, Fingerprint: fp}); act.Drop || act.Reset {
		abort(a, act.Reset)
		abort(b, act.Reset)
		return
	}
	wt := orDur(r.WriteTimeout, DefaultWriteTimeout)
	for _, s := range []*side{a, b} {
		_ = s.conn.SetWriteDeadline(time.Now().Add(wt))
		if _, err := io.WriteString(s.conn, wire.Ack); err != nil {
			r.log().Info("relay: ack failed", "secret_fp", fp, "err", err)
			return
		}
	}
	if len(sl.early) > 0 {
		// a's bytes from before the pair, in order, after b's ack.
		_ = b.conn.SetWriteDeadline(time.Now().Add(wt))
		if _, err := b.conn.Write(sl.early); err != nil {
			r.log().Info("relay: passing on early bytes failed", "secret_fp", fp, "err", err)
			return
		}
		sl.early = nil
	}
	_ = a.conn.SetReadDeadline(time.Time{})
	_ = a.conn.SetWriteDeadline(time.Time{})
	_ = b.conn.SetWriteDeadline(time.Time{})
	r.stats.Paired.Add(1)
	r.log().Debug("relay: paired", "secret_fp", fp)
	t0 := time.Now()
	ab, ba, err := r.splice(a, b, fp)
	r.log().Debug("relay: pair done", "secret_fp", fp, "a_to_b", ab, "b_to_a", ba,
		"duration", time.Since(t0), "err", err)
}

// splice copies both ways, one goroutine per direction. An orderly end of
// one direction is passed on as a half-close so the other keeps flowing; an
// error in either direction ends both.
func (r *Relay) splice(a, b *side, fp string) (ab, ba int64, err error) {
	type result struct {
		n   int64
		err error
		dir string
	}
	res := make(chan result, 2)
	act := &pairActivity{}
	act.last.Store(time.Now().UnixNano())
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		if why := r.watch(act, stopWatch); why != "" {
			r.log().Info("relay: pair ended", "secret_fp", fp, "reason", why)
			abort(a, true)
			abort(b, true)
		}
	}()
	defer func() { close(stopWatch); <-watched }()
	pipe := func(dst, src *side, dir string) {
		n, err := r.copy(dst, src, fp, act, dir == "b -> a")
		if err == nil {
			halfClose(dst)
		} else {
			err = fmt.Errorf("%s: %w", dir, err)
			// Tear down both, with resets: a peer that vanished must look
			// vanished to the other side, not like an orderly end of input.
			abort(a, true)
			abort(b, true)
		}
		res <- result{n, err, dir}
	}
	go pipe(b, a, "a -> b")
	go pipe(a, b, "b -> a")
	for range 2 {
		x := <-res
		if x.dir == "a -> b" {
			ab = x.n
		} else {
			ba = x.n
		}
		err = errors.Join(err, x.err)
	}
	return ab, ba, err
}

func halfClose(s *side) {
	if cw, ok := s.conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite() // best effort: close_notify (TLS) or FIN
	}
	if s.conn != s.raw {
		if cw, ok := s.raw.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite() // best effort: FIN after close_notify
		}
	}
}

// copy moves src to dst until src ends (nil error) or anything fails.
// Without Coalesce, what a read brings is passed on at once, together with
// the records TLS already holds (read without waiting), in one write(2).
// It records its progress in act for the pair's watch.
func (r *Relay) copy(dst, src *side, fp string, act *pairActivity, second bool) (int64, error) {
	writing := &act.writing[0]
	if second {
		writing = &act.writing[1]
	}
	size := batchSize
	if r.Coalesce {
		size = RecordSize
	}
	buf := make([]byte, size)
	var total int64
	fill := 0
	flush := func() error {
		if fill == 0 {
			return nil
		}
		if r.Fault != nil {
			if act := r.fault(FaultEvent{Stage: FaultData, Fingerprint: fp, Bytes: total}); act.Drop || act.Reset {
				abort(src, act.Reset)
				abort(dst, act.Reset)
				return errors.New("fault injected")
			}
		}
		// A peer that reads slowly (a paused terminal, a process not
		// reading its stdin) is not dead: the watch bounds only a write
		// that moves nothing at all (SpliceStall).
		writing.Store(time.Now().UnixNano())
		n, err := wire.WriteBatched(dst.batch, dst.conn, buf[:fill])
		writing.Store(0)
		total += int64(n)
		r.stats.Spliced.Add(int64(n))
		fill = 0
		act.last.Store(time.Now().UnixNano())
		return err
	}
	empty := 0
	drain := false // the next read takes only what TLS holds already
	for {
		switch {
		case r.Coalesce && fill > 0:
			_ = src.conn.SetReadDeadline(time.Now().Add(coalesceFlush))
		case drain:
			_ = src.conn.SetReadDeadline(time.Unix(1, 0)) // a read that needs the socket fails at once
		}
		n, err := src.conn.Read(buf[fill:])
		fill += n
		timed := r.Coalesce && fill > 0 || drain
		if timed {
			_ = src.conn.SetReadDeadline(time.Time{})
		}
		drain = false
		switch {
		case err == nil && n == 0:
			if empty++; empty > 100 {
				return total, errors.New("no progress: repeated empty reads")
			}
			continue
		case err == nil:
			empty = 0
			switch {
			case fill == len(buf), !r.Coalesce && src.batch == nil:
				if err := flush(); err != nil {
					return total, err
				}
			case !r.Coalesce:
				drain = true
			}
		case timed && errors.Is(err, os.ErrDeadlineExceeded):
			if err := flush(); err != nil {
				return total, err
			}
		case errors.Is(err, io.EOF):
			return total, flush()
		default:
			if ferr := flush(); ferr != nil {
				return total, ferr
			}
			return total, err
		}
	}
}

// Shutdown stops accepting, closes connections still waiting for a partner,
// and waits for active pairs to finish until ctx ends; then it closes them.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.mu.Lock()
	if !r.closing {
		r.closing = true
		if r.quit == nil {
			r.quit = make(chan struct{})
		}
		close(r.quit)
		if r.ln != nil {
			_ = r.ln.Close() // best effort
		}
		for _, sl := range r.slots {
			if sl.b == nil {
				_ = sl.a.conn.SetReadDeadline(time.Unix(1, 0)) // its wait ends, closing it
			}
		}
	}
	r.mu.Unlock()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	r.mu.Lock()
	for c := range r.conns {
		_ = c.Close() // best effort: grace is over
	}
	r.mu.Unlock()
	<-done
	return ctx.Err()
}

// Close stops the relay at once, closing every connection.
func (r *Relay) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = r.Shutdown(ctx)
	return nil
}

func orDur(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

func orInt(n, def int) int {
	if n == 0 {
		return def
	}
	return n
}

func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// pairActivity is a spliced pair's progress, for its watch: the last time
// anything moved either way, and when each direction's write in progress
// began (0: none). Atomics on the hot path, and no deadline to reset per
// read or write.
type pairActivity struct {
	last    atomic.Int64
	writing [2]atomic.Int64
}

// watch checks act a few times per bound until stop is closed, and says
// why the pair must end: nothing moved for SpliceIdle, or a write made no
// progress for SpliceStall (its reader stopped: a relay must not hold such
// pairs, and their buffers, for ever).
func (r *Relay) watch(act *pairActivity, stop <-chan struct{}) string {
	idle := orDur(r.SpliceIdle, DefaultSpliceIdle)
	stall := orDur(r.SpliceStall, DefaultSpliceStall)
	tick := time.Duration(1<<63 - 1)
	for _, d := range []time.Duration{idle, stall} {
		if d > 0 {
			tick = min(tick, d/4)
		}
	}
	if tick == 1<<63-1 {
		<-stop
		return ""
	}
	t := time.NewTicker(max(tick, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return ""
		case <-t.C:
		}
		now := time.Now().UnixNano()
		if idle > 0 && now-act.last.Load() > int64(idle) {
			return fmt.Sprintf("nothing moved either way for %v", idle)
		}
		for i := range act.writing {
			if w := act.writing[i].Load(); stall > 0 && w != 0 && now-w > int64(stall) {
				return fmt.Sprintf("a write made no progress for %v (the reader stopped reading)", stall)
			}
		}
	}
}

// quickAck has the kernel acknowledge at once what arrives next on c
// (TCP_QUICKACK, which it turns off again by itself): a client with
// Nagle's algorithm on holds its next small write until its last one is
// acknowledged, and a delayed ACK would cost it up to 40 ms per round.
func quickAck(c net.Conn) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, unix.TCP_QUICKACK, 1) // best effort
	})
}
