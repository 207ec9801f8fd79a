package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/term"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// sessionFlags are the flags of a session's process and pump.
type sessionFlags struct {
	noTTY, raw, shell, marker, keepEOFByte bool
	env                                    multiFlag
	cols, lines                            int
	dir                                    string
	pump                                   ptyio.Config
	user                                   string
	ctr                                    container.Spec
	pids                                   int64
	setup                                  time.Duration
}

func (f *sessionFlags) register(fs *flagSet) {
	fs.BoolVar(&f.noTTY, "no-tty", false, "run with plain pipes instead of a pty (stdout and stderr merged, binary-exact)")
	fs.BoolVar(&f.raw, "raw", false, "raw pty: no echo, no CR/LF rewriting, no line editing (for programs)")
	fs.BoolVar(&f.shell, "shell", false, "COMMAND is one string, run with bash -c (sh -c where bash is missing)")
	fs.BoolVar(&f.marker, "exit-status-marker", false, "after all output, write the Heroku CLI's exit-status line")
	fs.BoolVar(&f.keepEOFByte, "binary-input", false, "with --no-tty, pass 0x04 through instead of taking it as end of input")
	fs.Var(&f.env, "env", "`K=V` for the command's environment (repeatable); the command gets only these (plus PATH; TERM, COLUMNS and LINES with a pty; HOME, USER, LOGNAME and SHELL with --user)")
	fs.IntVar(&f.cols, "cols", 0, "pty width (default: COLUMNS from --env, else 80)")
	fs.IntVar(&f.lines, "lines", 0, "pty height (default: LINES from --env, else 24)")
	fs.StringVar(&f.dir, "dir", "", "working `directory` of the command (default: the user's home with --user or a container, else the agent's)")
	fs.StringVar(&f.user, "user", "", "run as `USER`: NAME, UID, NAME:GROUP or UID:GID, looked up in the container's /etc/passwd and /etc/group")
	fs.IntVar(&f.ctr.PID, "container-pid", 0, "run inside the namespaces and root of this running `PID` (join its container)")
	fs.StringVar(&f.ctr.Rootfs, "rootfs", "", "run in a new sandbox rooted at `DIR` (new PID, mount, UTS and IPC namespaces, own /proc and /dev)")
	fs.StringVar(&f.ctr.Hostname, "hostname", "", "with --rootfs: the sandbox's hostname (default \""+container.DefaultHostname+"\")")
	fs.StringVar(&f.ctr.Network, "network", "", "with --rootfs: \"host\" (default) or \"none\" (own network namespace, loopback only)")
	fs.Int64Var(&f.pids, "limit-pids", container.DefaultPidsLimit(), "at most `N` tasks in the session or sandbox (cgroup pids; a joined command is held by its container's); 0: no limit (default 4096 as root, 0 otherwise)")
	fs.Int64Var(&f.ctr.Limits.Memory, "limit-memory", 0, "memory limit of the session or sandbox in `BYTES` (cgroup memory); 0: no limit (default 4096 as root, 0 otherwise)")
	fs.Int64Var(&f.ctr.OverlaySize, "overlay-size", 0, "with --overlay: the writable layer's size in `BYTES` (default: --limit-memory if set, else 1 GiB)")
	fs.DurationVar(&f.setup, "setup-timeout", container.DefaultSetupTimeout, "bound on setting up the command (user lookup, sandbox or join) once paired; past it the session fails (125)")
	fs.Uint64Var(&f.ctr.Limits.NoFile, "limit-nofile", 0, "with --rootfs: open files per process (RLIMIT_NOFILE); 0: the agent's")
	fs.BoolVar(&f.ctr.Overlay, "overlay", false, "with --rootfs: leave DIR untouched; the sandbox writes to a layer in memory, gone after")
	fs.BoolVar(&f.ctr.Privileged, "privileged", false, "with --rootfs: no hardening (every capability, no seccomp, no device allowlist, /proc unmasked); default: held as a container runtime's defaults hold a container")
	fs.Uint64Var(&f.ctr.Limits.NProc, "limit-nproc", 0, "with --rootfs: processes per user (RLIMIT_NPROC); 0: the agent's")
	fs.DurationVar(&f.pump.IdleTimeout, "idle-timeout", ptyio.DefaultIdleTimeout, "end the session when nothing moved (and nothing is queued) this long; negative: never")
	fs.DurationVar(&f.pump.StallTimeout, "stall-timeout", ptyio.DefaultStallTimeout, "end the session when output cannot be written this long")
	fs.DurationVar(&f.pump.MaxDuration, "max-duration", ptyio.DefaultMaxDuration, "end the session after this long; negative: never")
	fs.DurationVar(&f.pump.DrainTimeout, "drain-timeout", ptyio.DefaultDrainTimeout, "after the command exits, copy remaining output at most this long")
	fs.DurationVar(&f.pump.Linger, "linger", ptyio.DefaultLinger, "after the stream is closed, wait this long for the client's end")
	fs.DurationVar(&f.pump.KillGrace, "kill-grace", ptyio.DefaultKillGrace, "between SIGTERM and SIGKILL when a session is ended")
}

func (f *sessionFlags) spec(argv []string) (ptyio.Spec, ptyio.Config, error) {
	var sp ptyio.Spec
	if f.noTTY && f.raw {
		return sp, f.pump, usagef("--raw needs a pty: it conflicts with --no-tty")
	}
	if f.keepEOFByte && !f.noTTY {
		return sp, f.pump, usagef("--binary-input applies with --no-tty only (a pty's line discipline owns 0x04)")
	}
	if len(argv) == 0 {
		return sp, f.pump, usagef("missing COMMAND after --")
	}
	switch {
	case f.ctr.PID == 0:
		f.ctr.Limits.Pids = f.pids
	case f.pids != container.DefaultPidsLimit() && f.pids != 0:
		return sp, f.pump, usagef("--limit-pids with --container-pid: a joined command is held by its container's own limits")
	}
	if err := f.ctr.Validate(); err != nil {
		return sp, f.pump, usagef("%s (see --container-pid, --rootfs)", err)
	}
	if f.user != "" {
		if err := container.CheckUserSpec(f.user); err != nil {
			return sp, f.pump, usagef("--user %v", err)
		}
	}
	if f.shell {
		if len(argv) != 1 {
			return sp, f.pump, usagef("--shell takes COMMAND as one string, got %d arguments (quote it)", len(argv))
		}
		argv = []string{f.ctr.Shell(), "-c", argv[0]}
	}
	for _, kv := range f.env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return sp, f.pump, usagef("--env %q: want K=V", kv)
		}
	}
	cols, lines, err := size(f.cols, f.lines, f.env)
	if err != nil {
		return sp, f.pump, err
	}
	if err := f.pump.Validate(); err != nil {
		return sp, f.pump, usageError{err.Error()}
	}
	sp = ptyio.Spec{Argv: argv, Env: append([]string(nil), f.env...), Dir: f.dir, TTY: !f.noTTY, Raw: f.raw,
		Cols: uint16(cols), Rows: uint16(lines)}
	pc := f.pump
	pc.EOFByte = f.noTTY && !f.keepEOFByte
	return sp, pc, nil
}

// size picks the pty size: the flags, else COLUMNS/LINES from --env.
func size(cols, lines int, env []string) (int, int, error) {
	get := func(flagV int, name, key string) (int, error) {
		if flagV != 0 {
			if flagV < 1 || flagV > 65535 {
				return 0, usagef("--%s %d: want 1 to 65535", name, flagV)
			}
			return flagV, nil
		}
		for _, kv := range env {
			if k, v, _ := strings.Cut(kv, "="); k == key {
				n, err := strconv.Atoi(v)
				if err != nil || n < 1 || n > 65535 {
					return 0, usagef("--env %s=%q: want a number from 1 to 65535", key, v)
				}
				flagV = n
			}
		}
		return flagV, nil
	}
	c, err := get(cols, "cols", "COLUMNS")
	if err != nil {
		return 0, 0, err
	}
	l, err := get(lines, "lines", "LINES")
	return c, l, err
}

func runAttach(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("attach", "[flags] -- COMMAND [ARG...]   (the URL in $ATTACH_URL or --url-file)",
		"ATTACH_URL=rendezvous://127.0.0.1:5000/SECRET attach-agent attach --ca relay-ca.pem --exit-status-marker -- bash -l", io.err)
	var d dialFlags
	d.register(fs.FlagSet)
	var sf sessionFlags
	sf.register(fs)
	var us urlSource
	us.register(fs)
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	rest := fs.Args()
	// "attach URL -- COMMAND" still works (with a warning); "attach --
	// COMMAND" has lost its "--" to the flag parser.
	positional := len(rest) > 0 && strings.Contains(rest[0], "://") && (len(rest) == 1 || rest[1] == "--")
	if len(rest) > 1 && strings.Contains(rest[0], "://") && !positional {
		return exitUsage, usagef("put -- between ATTACH_URL and COMMAND (got %q); better, pass the URL in $%s", rest[1], urlEnv)
	}
	u, rest, err := us.resolve(rest, positional, io.in, io.err)
	if err != nil {
		return exitUsage, err
	}
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	}
	pspec, pcfg, err := sf.spec(rest)
	if err != nil {
		return exitUsage, err
	}
	dcfg, err := d.config()
	if err != nil {
		return exitUsage, err
	}
	log := slog.New(slog.NewTextHandler(io.err, nil))
	spec := agent.Spec{URL: u, Dial: dcfg, Process: pspec, Pump: pcfg, ExitStatusMarker: sf.marker,
		User: sf.user, Container: sf.ctr, SetupTimeout: sf.setup}
	res := agent.Run(ctx, spec, log)
	agent.LogResult(log, spec.About(), res)
	return attachExit(res, io)
}

// attachExit maps a session to attach's exit status: the command's, else
// 125 (126/127 for a command that could not run), with one line on stderr
// for every failure that is not the command's own.
func attachExit(res agent.Result, io stdio) (int, error) {
	switch res.Reason {
	case ptyio.ReasonExited:
		return res.ExitCode, nil
	case agent.ReasonDialFailed, agent.ReasonPairTimeout, agent.ReasonSpawnFailed:
		return res.ExitCode, fmt.Errorf("%s: %v", res.Reason, res.Err)
	}
	fmt.Fprintf(io.err, "attach-agent attach: session ended: %s: %v\n", res.Reason, res.Err)
	return res.ExitCode, nil
}

func runDemo(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("demo", "[flags] [-- COMMAND [ARG...]]", "attach-agent demo            # your shell, through a local TLS relay", io.err)
	var sf sessionFlags
	sf.register(fs)
	verbose := fs.Bool("v", false, "log the relay and the session to stderr")
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	rest := fs.Args()
	if len(rest) > 0 && rest[0] == "--" {
		rest = rest[1:]
	}
	if len(rest) == 0 {
		sh := os.Getenv("SHELL")
		if sh == "" {
			sh = "/bin/sh"
		}
		rest = []string{sh}
	}
	// The demo runs the user's own command as the user, so it passes the
	// few variables a shell needs; a real session gets only what it is given.
	for _, k := range []string{"HOME", "USER", "LOGNAME", "LANG", "PATH", "TERM", "SHELL"} {
		if v, ok := os.LookupEnv(k); ok {
			sf.env = append(sf.env, k+"="+v)
		}
	}
	inFile, isFile := io.in.(*os.File)
	if isFile && term.IsTerminal(int(inFile.Fd())) && sf.cols == 0 && sf.lines == 0 {
		if w, h, err := term.GetSize(int(inFile.Fd())); err == nil {
			sf.cols, sf.lines = w, h
		}
	}
	pspec, pcfg, err := sf.spec(rest)
	if err != nil {
		return exitUsage, err
	}
	log := slog.New(slog.DiscardHandler)
	if *verbose {
		log = slog.New(slog.NewTextHandler(io.err, nil))
	}

	relay := &rendezvous.Relay{Logger: log}
	if err := relay.Listen("tcp", "127.0.0.1:0"); err != nil {
		return exitAgentErr, err
	}
	served := make(chan error, 1)
	go func() { served <- relay.Serve() }()
	defer func() { _ = relay.Close(); <-served }()

	secret := make([]byte, 16)
	_, _ = rand.Read(secret)
	// Protocol v2: stderr apart, the window size followed, the status in band.
	u := tlsdial.URL{Host: "127.0.0.1", Port: relay.Addr().(*net.TCPAddr).Port, Secret: hex.EncodeToString(secret), V2: true}
	dial := tlsdial.Config{TLS: clientTLSFor(relay), DialTimeout: 10 * time.Second, PairTimeout: 10 * time.Second}
	fmt.Fprintf(io.err, "attach-agent demo: relay on %s (TLS, throwaway CA); running %s; exit or Ctrl-D ends it\r\n",
		relay.Addr(), strings.Join(pspec.Argv, " "))

	sessCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan agent.Result, 1)
	go func() {
		spec := agent.Spec{URL: u, Dial: dial, Process: pspec, Pump: pcfg, ExitStatusMarker: true,
			User: sf.user, Container: sf.ctr, SetupTimeout: sf.setup}
		res := agent.Run(sessCtx, spec, log)
		agent.LogResult(log, spec.About(), res)
		done <- res
	}()

	// The client is connect's own (v2: the end of input in band).
	code, cerr := runClient(ctx, u, dial, io, attach.Config{})
	if cerr != nil {
		cancel()
	}
	res := <-done
	switch {
	case res.Reason != ptyio.ReasonExited && res.Reason != ptyio.ReasonClientGone:
		return attachExit(res, io)
	case cerr != nil:
		return code, cerr
	}
	return code, nil
}

func clientTLSFor(r *rendezvous.Relay) *tls.Config {
	return &tls.Config{RootCAs: r.Certs().CAPool, MinVersion: tls.VersionTLS12}
}
