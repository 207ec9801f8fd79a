package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/term"

	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// dialFlags are the flags every command that dials a relay shares.
type dialFlags struct {
	ca, cert, key                   string
	plain                           bool
	connect, handshake, dial, pairT time.Duration
}

func (d *dialFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&d.ca, "ca", "", "PEM `file` of CA certificates that sign the relay's certificate (default: system roots)")
	fs.StringVar(&d.cert, "cert", "", "client certificate `file` (PEM) for mutual TLS; needs --key")
	fs.StringVar(&d.key, "key", "", "client key `file` (PEM) for mutual TLS; needs --cert")
	fs.BoolVar(&d.plain, "plain", false, "dial plain TCP, no TLS (a relay behind a TLS-terminating balancer)")
	fs.DurationVar(&d.connect, "connect-timeout", tlsdial.DefaultConnectTimeout, "bound on one TCP connect attempt")
	fs.DurationVar(&d.handshake, "handshake-timeout", tlsdial.DefaultHandshakeTimeout, "bound on one TLS handshake")
	fs.DurationVar(&d.dial, "dial-timeout", tlsdial.DefaultDialTimeout, "bound on all dial attempts together (retries with back-off inside it)")
	fs.DurationVar(&d.pairT, "pair-timeout", tlsdial.DefaultPairTimeout, "how long to wait for the other side to pair")
}

func (d *dialFlags) config() (tlsdial.Config, error) {
	cfg := tlsdial.DefaultConfig()
	cfg.ConnectTimeout, cfg.HandshakeTimeout, cfg.DialTimeout, cfg.PairTimeout = d.connect, d.handshake, d.dial, d.pairT
	if err := cfg.Validate(); err != nil {
		return cfg, usageError{err.Error()}
	}
	for name, v := range map[string]time.Duration{"--connect-timeout": d.connect, "--handshake-timeout": d.handshake, "--dial-timeout": d.dial, "--pair-timeout": d.pairT} {
		if v <= 0 {
			return cfg, usagef("%s must be positive, got %v", name, v)
		}
	}
	if d.plain {
		if d.ca != "" || d.cert != "" || d.key != "" {
			return cfg, usagef("--plain conflicts with --ca, --cert and --key (no TLS is spoken)")
		}
		cfg.Plain = true
		return cfg, nil
	}
	if (d.cert == "") != (d.key == "") {
		return cfg, usagef("give both --cert and --key, or neither")
	}
	t, err := tlsdial.LoadTLS(d.ca, d.cert, d.key)
	if err != nil {
		return cfg, usageError{err.Error()}
	}
	cfg.TLS = t
	return cfg, nil
}

func runRendezvous(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("rendezvous", "--listen ADDR [--cert F --key F | --self-signed-ca-out FILE | --plain]",
		"attach-agent rendezvous --listen 127.0.0.1:5000 --self-signed-ca-out /tmp/relay-ca.pem", io.err)
	var (
		listen, cert, key, caOut string
		plain, coalesce          bool
		firstLine, pairT, grace  time.Duration
		maxUnpaired              int
	)
	fs.StringVar(&listen, "listen", "127.0.0.1:5000", "`address` to listen on")
	fs.StringVar(&cert, "cert", "", "server certificate `file` (PEM); the default certificate, served without SNI")
	fs.StringVar(&key, "key", "", "server key `file` (PEM)")
	fs.StringVar(&caOut, "self-signed-ca-out", "", "make a throwaway CA and certificate for localhost, 127.0.0.1 and ::1, and write the CA to this `file` for clients (--ca)")
	fs.BoolVar(&plain, "plain", false, "serve plain TCP (behind a TLS-terminating load balancer)")
	fs.BoolVar(&coalesce, "coalesce", false, "pack spliced bytes into 16 KiB TLS records, like some load balancers (testing)")
	fs.DurationVar(&firstLine, "first-line-timeout", rendezvous.DefaultFirstLineTimeout, "bound from accept to the end of the secret line")
	fs.DurationVar(&pairT, "pair-timeout", rendezvous.DefaultPairTimeout, "how long one side waits for the other")
	fs.IntVar(&maxUnpaired, "max-unpaired", rendezvous.DefaultMaxUnpaired, "connections that may wait for a partner at once")
	fs.DurationVar(&grace, "shutdown-grace", 30*time.Second, "on SIGTERM, how long open pairs may go on before they are cut")
	var maxConns, perSource, unpairedPerSource int
	var spliceIdle, spliceStall time.Duration
	fs.IntVar(&maxConns, "max-conns", rendezvous.DefaultMaxConns, "open connections in all; more are closed at accept")
	fs.IntVar(&perSource, "max-conns-per-source", rendezvous.DefaultMaxConnsPerSource, "open connections from one source address")
	fs.IntVar(&unpairedPerSource, "max-unpaired-per-source", rendezvous.DefaultMaxUnpairedPerSource, "connections from one source address that may wait for a partner")
	fs.DurationVar(&spliceIdle, "splice-idle", rendezvous.DefaultSpliceIdle, "a pair that moves nothing either way this long is ended")
	fs.DurationVar(&spliceStall, "splice-stall", rendezvous.DefaultSpliceStall, "a pair one of whose sides reads nothing this long (a write made no progress) is ended")
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	if fs.NArg() > 0 {
		return exitUsage, usagef("unexpected argument %q", fs.Arg(0))
	}
	modes := 0
	for _, on := range []bool{cert != "" || key != "", caOut != "", plain} {
		if on {
			modes++
		}
	}
	switch {
	case modes == 0:
		return exitUsage, usagef("say how to serve: --cert and --key, or --self-signed-ca-out FILE, or --plain")
	case modes > 1:
		return exitUsage, usagef("--cert/--key, --self-signed-ca-out and --plain exclude each other")
	case (cert == "") != (key == ""):
		return exitUsage, usagef("give both --cert and --key")
	case firstLine <= 0 || pairT <= 0 || maxUnpaired <= 0 || grace < 0:
		return exitUsage, usagef("--first-line-timeout, --pair-timeout and --max-unpaired must be positive")
	case maxConns <= 0 || perSource <= 0 || unpairedPerSource <= 0 || spliceIdle <= 0 || spliceStall <= 0:
		return exitUsage, usagef("--max-conns, --max-conns-per-source, --max-unpaired-per-source, --splice-idle and --splice-stall must be positive")
	}
	log := slog.New(slog.NewTextHandler(io.err, nil))
	r := &rendezvous.Relay{Plain: plain, Coalesce: coalesce, FirstLineTimeout: firstLine, PairTimeout: pairT,
		MaxUnpaired: maxUnpaired, MaxConns: maxConns, MaxConnsPerSource: perSource, MaxUnpairedPerSource: unpairedPerSource,
		SpliceIdle: spliceIdle, SpliceStall: spliceStall, Logger: log}
	if cert != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return exitUsage, usagef("--cert/--key: %v", err)
		}
		r.TLSConfig = &tls.Config{Certificates: []tls.Certificate{pair}}
	}
	if err := r.Listen("tcp", listen); err != nil {
		return exitFailure, err
	}
	if caOut != "" {
		if err := os.WriteFile(caOut, r.CAPEM(), 0o644); err != nil {
			_ = r.Close()
			return exitFailure, fmt.Errorf("--self-signed-ca-out: %w", err)
		}
	}
	log.Info("relay listening", "addr", r.Addr().String(), "plain", plain, "coalesce", coalesce)
	done := make(chan error, 1)
	go func() { done <- r.Serve() }()
	select {
	case err := <-done:
		return exitFailure, err
	case <-ctx.Done():
	}
	log.Info("relay shutting down", "grace", grace)
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	_ = r.Shutdown(sctx) // cuts what is left at the grace
	<-done
	return exitOK, nil
}

func runConnect(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("connect", "[flags]   (the URL in $ATTACH_URL or --url-file)",
		"ATTACH_URL=rendezvous://127.0.0.1:5000/SECRET attach-agent connect --ca /tmp/relay-ca.pem", io.err)
	var d dialFlags
	d.register(fs.FlagSet)
	var binary bool
	var keepalive, peerTimeout time.Duration
	fs.DurationVar(&keepalive, "keepalive", attach.DefaultKeepalive, "protocol v2 (#v2): ping the agent this often; negative: never")
	fs.DurationVar(&peerTimeout, "peer-timeout", attach.DefaultPeerTimeout, "protocol v2: the link is lost (exit 255) when the agent is not heard this long; negative: never")
	fs.BoolVar(&binary, "binary", false, "at the end of stdin half-close the stream instead of sending 0x04 (for sessions with --binary-input or --raw, which take a half-close as end of input)")
	var us urlSource
	us.register(fs)
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	if fs.NArg() > 1 {
		return exitUsage, usagef("want at most one argument (ATTACH_URL, better in $%s), got %d", urlEnv, fs.NArg())
	}
	if us.file == "-" {
		return exitUsage, usagef("connect forwards stdin to the session: give --url-file a file, or use $%s", urlEnv)
	}
	u, _, err := us.resolve(fs.Args(), true, io.in, io.err)
	if err != nil {
		return exitUsage, err
	}
	cfg, err := d.config()
	if err != nil {
		return exitUsage, err
	}
	return runClient(ctx, u, cfg, io, attach.Config{HalfCloseAtEOF: binary, Keepalive: keepalive, PeerTimeout: peerTimeout})
}

// runClient is connect's client (and demo's): the session through the
// attach package, this terminal raw, its window size sent at the start
// and on SIGWINCH (v2), stderr frames to stderr (v2), and the remote
// status as the exit code: 128+N for a signal; 255, with the reason, for
// a v2 link lost. Over the Heroku wire: 0x04 at the end of stdin (a
// half-close with cfg.HalfCloseAtEOF), the status from the marker, else 0.
func runClient(ctx context.Context, u tlsdial.URL, dial tlsdial.Config, io stdio, cfg attach.Config) (int, error) {
	cfg.Dial = dial
	tty, isTerm := io.in.(*os.File)
	isTerm = isTerm && term.IsTerminal(int(tty.Fd()))
	if isTerm {
		if cols, rows, err := term.GetSize(int(tty.Fd())); err == nil && cols > 0 && rows > 0 {
			cfg.Cols, cfg.Rows = uint16(min(cols, 65535)), uint16(min(rows, 65535))
		}
	}
	s, err := attach.DialURL(ctx, u, cfg)
	if err != nil {
		return exitFailure, err
	}
	defer s.Close()
	restore := rawTerminal(io)
	defer restore()
	s.Stdin, s.Stdout, s.Stderr = io.in, io.out, io.err
	if err := s.Start(); err != nil {
		return exitFailure, err
	}
	if s.V2() && isTerm {
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		go func() {
			for range winch {
				if cols, rows, err := term.GetSize(int(tty.Fd())); err == nil {
					_ = s.Resize(cols, rows) // best effort: the session may be ending
				}
			}
		}()
	}
	stop := context.AfterFunc(ctx, func() { _ = s.Close() })
	defer stop()
	err = s.Wait()
	restore()
	var ee *attach.ExitError
	var le *attach.LinkError
	switch {
	case err == nil:
		return exitOK, nil
	case errors.As(err, &ee):
		if ee.Reason != "" && ee.Reason != "exited" {
			fmt.Fprintf(io.err, "attach-agent connect: session ended: %s: %s\n", ee.Reason, ee.Message)
		}
		return ee.Code, nil
	case errors.Is(err, attach.ErrNoStatus):
		return exitOK, nil // the Heroku wire without the marker, as the Heroku CLI
	case errors.As(err, &le) && s.V2():
		return exitLinkLost, err
	case ctx.Err() != nil:
		return exitFailure, context.Cause(ctx)
	}
	return exitFailure, err
}

// rawTerminal puts stdin in raw mode when it is a terminal, so keystrokes
// (Ctrl-C included) go to the remote pty; the returned func restores it and
// may be called more than once.
func rawTerminal(io stdio) func() {
	f, ok := io.in.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return func() {}
	}
	old, err := term.MakeRaw(int(f.Fd()))
	if err != nil {
		return func() {}
	}
	restored := false
	return func() {
		if !restored {
			restored = true
			_ = term.Restore(int(f.Fd()), old) // best effort
		}
	}
}
