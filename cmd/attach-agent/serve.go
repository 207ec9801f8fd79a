package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/attach-agent/attach-agent/daemon"
)

// runServe wires serve's flags into daemon.Config; the daemon package does
// the rest.
func runServe(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("serve", "[flags]",
		"attach-agent serve --ca /etc/attach-agent/relay-ca.pem --control /run/attach-agent/control.sock", io.err)
	cfg := daemon.DefaultConfig()
	var d dialFlags
	d.register(fs.FlagSet)
	fs.StringVar(&cfg.Control, "control", cfg.Control, "unix socket `path` of the control API (mode 0660, directory 0750); systemd socket activation (LISTEN_FDS) is used instead when present")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "`directory` of the session records (sessions/ID, mode 0700) a restarted daemon adopts its workers from; a tmpfs such as /run")
	fs.StringVar(&cfg.MetricsListen, "metrics-listen", cfg.MetricsListen, "`address` for /metrics (Prometheus); empty: off")
	fs.StringVar(&cfg.LogFormat, "log-format", cfg.LogFormat, "journald, text, json, or auto (journald when stderr is the journal)")
	fs.StringVar(&cfg.OnSIGTERM, "on-sigterm", cfg.OnSIGTERM, "handover: exit within 2s, sessions go on in their workers and the next daemon adopts them (systemd with KillMode=process); drain: end sessions (--shutdown-grace) first, for orchestrators that kill what a task leaves (Kubernetes, Nomad)")
	fs.IntVar(&cfg.MaxSessions, "max-sessions", cfg.MaxSessions, "sessions running at once; more get 429")
	fs.IntVar(&cfg.Spares, "spare-workers", cfg.Spares, "workers started ahead, waiting for a session (keeps process start off the path to the first byte)")
	fs.Func("allow-uid", "a `UID` that may use the control API (repeatable; with neither this nor --allow-gid: root and the control socket's group)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		cfg.Access.UIDs = append(cfg.Access.UIDs, uint32(n))
		return err
	})
	fs.Func("allow-gid", "a `GID` whose members (by primary group) may use the control API (repeatable)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		cfg.Access.GIDs = append(cfg.Access.GIDs, uint32(n))
		return err
	})
	fs.BoolVar(&cfg.Access.AllowRootUser, "allow-root-user", cfg.Access.AllowRootUser, "let a request run its command as root (no user, or uid 0 in the container)")
	fs.BoolVar(&cfg.Access.AllowJoin, "allow-join", cfg.Access.AllowJoin, "let a request join a running container (container.pid)")
	fs.BoolVar(&cfg.Access.AllowPrivileged, "allow-privileged", cfg.Access.AllowPrivileged, "let a request start a privileged sandbox (no hardening)")
	fs.Func("rootfs-under", "hold sandboxes' rootfs to `DIR` (repeatable; default: anywhere)", func(v string) error {
		if !filepath.IsAbs(v) {
			return fmt.Errorf("%q: want an absolute path", v)
		}
		cfg.Access.RootfsUnder = append(cfg.Access.RootfsUnder, v)
		return nil
	})
	fs.Int64Var(&cfg.DefaultPids, "limit-pids", cfg.DefaultPids, "pids limit of a host session or sandbox whose request sets none (cgroup pids); 0: none (default 4096 as root, 0 otherwise)")
	fs.DurationVar(&cfg.SetupTimeout, "setup-timeout", cfg.SetupTimeout, "bound on a session's setup once paired (user lookup, sandbox, join); past it spawn_failed")
	fs.DurationVar(&cfg.Keepalive, "keepalive", cfg.Keepalive, "protocol v2 sessions (#v2): ping the client this often; negative: never")
	fs.DurationVar(&cfg.PeerTimeout, "peer-timeout", cfg.PeerTimeout, "protocol v2 sessions: a client not heard this long is gone (client_gone); negative: never")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", cfg.ShutdownGrace, "how long running sessions may finish on a drain that names no grace, and on SIGTERM with --on-sigterm=drain (a second signal ends them at once)")
	fs.DurationVar(&cfg.Pump.IdleTimeout, "idle-timeout", cfg.Pump.IdleTimeout, "default idle timeout of a session")
	fs.DurationVar(&cfg.Pump.StallTimeout, "stall-timeout", cfg.Pump.StallTimeout, "a session ends when its output cannot be written this long")
	fs.DurationVar(&cfg.Pump.MaxDuration, "max-duration", cfg.Pump.MaxDuration, "default maximum session duration")
	fs.DurationVar(&cfg.Pump.KillGrace, "kill-grace", cfg.Pump.KillGrace, "between SIGTERM and SIGKILL when a session is ended")
	fs.DurationVar(&cfg.MaxPairTimeout, "max-pair-timeout", cfg.MaxPairTimeout, "the longest pair_timeout a request may ask for")
	fs.DurationVar(&cfg.MaxIdleTimeout, "max-idle-timeout", cfg.MaxIdleTimeout, "the longest idle_timeout a request may ask for")
	fs.DurationVar(&cfg.MaxMaxDuration, "max-max-duration", cfg.MaxMaxDuration, "the longest max_duration a request may ask for")
	fs.DurationVar(&cfg.KeepEnded, "keep-ended", cfg.KeepEnded, "how long ended sessions stay queryable")
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	if fs.NArg() > 0 {
		return exitUsage, usagef("unexpected argument %q", fs.Arg(0))
	}
	dcfg, err := d.config()
	if err != nil {
		return exitUsage, err
	}
	dcfg.TLS = nil // each worker makes its own from the files
	cfg.Dial, cfg.CA, cfg.Cert, cfg.Key = dcfg, d.ca, d.cert, d.key
	cfg.Version = version
	cfg.Stderr = io.err
	// For the tests of this binary only: a request label that makes its
	// session's worker panic (see daemon.Config.FaultLabel).
	cfg.FaultLabel = os.Getenv("ATTACH_AGENT_TEST_FAULT_LABEL")
	if err := cfg.Validate(); err != nil {
		return exitUsage, usageError{err.Error()}
	}
	if err := daemon.Serve(ctx, cfg); err != nil {
		return exitFailure, err
	}
	return exitOK, nil
}
