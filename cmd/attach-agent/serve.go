package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/journal"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
)

// DefaultControl is where serve listens for the lifecycle manager.
const DefaultControl = "/run/attach-agent/control.sock"

func runServe(ctx context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("serve", "[flags]",
		"attach-agent serve --ca /etc/attach-agent/relay-ca.pem --control /run/attach-agent/control.sock", io.err)
	var d dialFlags
	d.register(fs.FlagSet)
	var (
		control, metricsAddr, logFormat string
		maxSessions                     int
		grace                           time.Duration
		pump                            ptyio.Config
		maxPair, maxIdle, maxDur, keep  time.Duration
	)
	fs.StringVar(&control, "control", DefaultControl, "unix socket `path` of the control API (mode 0660, directory 0750); systemd socket activation (LISTEN_FDS) is used instead when present")
	fs.StringVar(&metricsAddr, "metrics-listen", "127.0.0.1:9464", "`address` for /metrics (Prometheus); empty: off")
	fs.StringVar(&logFormat, "log-format", "auto", "journald, text, json, or auto (journald when stderr is the journal)")
	fs.IntVar(&maxSessions, "max-sessions", 1000, "sessions running at once; more get 429")
	access := agent.DefaultAccess()
	fs.Func("allow-uid", "a `UID` that may use the control API (repeatable; with neither this nor --allow-gid: root and the control socket's group)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		access.UIDs = append(access.UIDs, uint32(n))
		return err
	})
	fs.Func("allow-gid", "a `GID` whose members (by primary group) may use the control API (repeatable)", func(v string) error {
		n, err := strconv.ParseUint(v, 10, 32)
		access.GIDs = append(access.GIDs, uint32(n))
		return err
	})
	fs.BoolVar(&access.AllowRootUser, "allow-root-user", true, "let a request run its command as root (no user, or uid 0 in the container)")
	fs.BoolVar(&access.AllowJoin, "allow-join", true, "let a request join a running container (container.pid)")
	fs.BoolVar(&access.AllowPrivileged, "allow-privileged", false, "let a request start a privileged sandbox (no hardening)")
	fs.Func("rootfs-under", "hold sandboxes' rootfs to `DIR` (repeatable; default: anywhere)", func(v string) error {
		if !filepath.IsAbs(v) {
			return fmt.Errorf("%q: want an absolute path", v)
		}
		access.RootfsUnder = append(access.RootfsUnder, v)
		return nil
	})
	var defaultPids int64
	var setup time.Duration
	fs.Int64Var(&defaultPids, "limit-pids", container.DefaultPidsLimit(), "pids limit of a host session or sandbox whose request sets none (cgroup pids); 0: none (default 4096 as root, 0 otherwise)")
	fs.DurationVar(&setup, "setup-timeout", container.DefaultSetupTimeout, "bound on a session's setup once paired (user lookup, sandbox, join); past it spawn_failed")
	fs.DurationVar(&grace, "shutdown-grace", 10*time.Minute, "on SIGTERM, how long running sessions may finish before they are ended (a second signal ends them at once)")
	fs.DurationVar(&pump.IdleTimeout, "idle-timeout", ptyio.DefaultIdleTimeout, "default idle timeout of a session")
	fs.DurationVar(&pump.StallTimeout, "stall-timeout", ptyio.DefaultStallTimeout, "a session ends when its output cannot be written this long")
	fs.DurationVar(&pump.MaxDuration, "max-duration", ptyio.DefaultMaxDuration, "default maximum session duration")
	fs.DurationVar(&pump.KillGrace, "kill-grace", ptyio.DefaultKillGrace, "between SIGTERM and SIGKILL when a session is ended")
	fs.DurationVar(&maxPair, "max-pair-timeout", 10*time.Minute, "the longest pair_timeout a request may ask for")
	fs.DurationVar(&maxIdle, "max-idle-timeout", 24*time.Hour, "the longest idle_timeout a request may ask for")
	fs.DurationVar(&maxDur, "max-max-duration", 7*24*time.Hour, "the longest max_duration a request may ask for")
	fs.DurationVar(&keep, "keep-ended", time.Hour, "how long ended sessions stay queryable")
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
	if err := pump.Validate(); err != nil {
		return exitUsage, usageError{err.Error()}
	}
	if maxSessions < 1 || grace < 0 || maxPair <= 0 || maxIdle <= 0 || maxDur <= 0 || keep <= 0 {
		return exitUsage, usagef("--max-sessions, --max-*-timeout, --max-max-duration and --keep-ended must be positive, --shutdown-grace not negative")
	}
	log, err := newLogger(logFormat, io.err, nil)
	if err != nil {
		return exitUsage, err
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "attach_agent_build_info", Help: "Build information; always 1.",
		ConstLabels: prometheus.Labels{"version": version}})
	build.Set(1)
	reg.MustRegister(build)
	metrics := agent.NewMetrics(reg)

	if os.Getpid() == 1 {
		// Orphans of sessions would be re-parented to us, and we reap only
		// our own commands (a wait for any child would take their statuses).
		log.Warn("running as PID 1: orphaned processes of sessions will stay zombies; run under an init (docker run --init, tini)")
	}
	// What an agent killed before us left running (its sessions' and
	// sandboxes' groups) ends now, not never.
	if n := container.Sweep(); n > 0 {
		log.Warn("ended what a previous agent left behind", "cgroups", n)
	}
	notify := func(state string) { _, _ = daemon.SdNotify(false, state) } // best effort: no systemd, no-op
	// SIGHUP (a terminal closed, or a reload habit) must not end the
	// host's sessions: it is logged and otherwise ignored.
	hups := make(chan os.Signal, 1)
	signal.Notify(hups, syscall.SIGHUP)
	defer signal.Stop(hups)
	hupDone := make(chan struct{})
	defer close(hupDone)
	go func() {
		for {
			select {
			case <-hups:
				log.Info("SIGHUP: nothing to reload; sessions go on (SIGTERM stops the daemon)")
			case <-hupDone:
				return
			}
		}
	}()
	mgr := agent.NewManager(agent.ManagerConfig{
		Dial: dcfg, Pump: pump, MaxSessions: maxSessions, MaxPairTimeout: maxPair, MaxIdleTimeout: maxIdle,
		MaxMaxDuration: maxDur, KeepEnded: keep, Logger: log, Metrics: metrics, DefaultPids: defaultPids, SetupTimeout: setup,
		OnSessionChange: func(n int) { notify(fmt.Sprintf("STATUS=%d active sessions", n)) },
	})

	ln, err := controlListener(control)
	if err != nil {
		return exitFailure, err
	}
	if len(access.UIDs) == 0 && len(access.GIDs) == 0 {
		access.UIDs = []uint32{0}
		// The socket's group: who the unit (SocketGroup=) or the operator
		// let reach it.
		if st, err := os.Stat(ln.Addr().String()); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Gid != 0 {
				access.GIDs = []uint32{sys.Gid}
			}
		}
	}
	api := &http.Server{Handler: agent.NewAPI(mgr, access), ConnContext: agent.ConnContext, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- api.Serve(ln) }()
	var msrv *http.Server
	metricsAt := ""
	if metricsAddr != "" {
		mln, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			_ = api.Close()
			return exitFailure, fmt.Errorf("--metrics-listen: %w", err)
		}
		metricsAt = mln.Addr().String()
		msrv = &http.Server{Handler: metricsMux(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- msrv.Serve(mln) }()
	}
	log.Info("attach-agent serving", "control", ln.Addr().String(), "metrics", metricsAt, "version", version)
	notify("READY=1\nSTATUS=0 active sessions")

	stopWatchdog := watchdog(notify)
	defer stopWatchdog()

	// A second SIGTERM/SIGINT during the grace ends sessions at once.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)
	select {
	case <-ctx.Done():
	case <-sigs:
	case err := <-errc:
		log.Error("listener failed", "err", err)
		_ = api.Close()
		return exitFailure, err
	}
	// The signal that ended the wait above reached sigs too (main's
	// NotifyContext and sigs both get every signal): drop it, so only a
	// second one cuts the grace short.
	select {
	case <-sigs:
	default:
	}
	notify("STOPPING=1")
	log.Info("shutting down", "active", mgr.Active(), "grace", grace)
	gctx, cancel := context.WithTimeout(context.Background(), grace)
	go func() {
		select {
		case <-sigs:
			log.Warn("second signal: ending sessions now")
			cancel()
		case <-gctx.Done():
		}
	}()
	mgr.Shutdown(gctx) // new requests get 503 from here on
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	_ = api.Shutdown(sctx)
	if msrv != nil {
		_ = msrv.Shutdown(sctx)
	}
	log.Info("stopped")
	return exitOK, nil
}

func metricsMux(reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}

// controlListener takes the socket systemd passed (LISTEN_FDS), or makes
// the unix socket at path: its directory 0750, the socket 0660.
func controlListener(path string) (net.Listener, error) {
	lns, err := activation.Listeners()
	if err == nil && len(lns) > 0 && lns[0] != nil {
		return lns[0], nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("--control: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("--control %s: exists and is not a socket; remove it or pick another path", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			_ = c.Close()
			return nil, fmt.Errorf("--control %s: another agent is serving there", path)
		}
		_ = os.Remove(path) // a stale socket from a previous run
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("--control: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("--control: %w", err)
	}
	return ln, nil
}

// watchdog pings systemd at half of WATCHDOG_USEC when it is set.
func watchdog(notify func(string)) (stop func()) {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil || d <= 0 {
		return func() {}
	}
	t := time.NewTicker(d / 2)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-t.C:
				notify("WATCHDOG=1")
			case <-done:
				return
			}
		}
	}()
	return func() { t.Stop(); close(done) }
}

// newLogger picks the log format; send is the journald sender (nil: real).
func newLogger(format string, stderr io.Writer, send agent.JournalSender) (*slog.Logger, error) {
	switch format {
	case "auto":
		if ok, _ := journal.StderrIsJournalStream(); ok {
			return slog.New(agent.NewJournalHandler(send, nil)), nil
		}
		return slog.New(slog.NewTextHandler(stderr, nil)), nil
	case "journald":
		return slog.New(agent.NewJournalHandler(send, nil)), nil
	case "text":
		return slog.New(slog.NewTextHandler(stderr, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(stderr, nil)), nil
	}
	return nil, usagef("--log-format %q: want journald, text, json or auto", format)
}
