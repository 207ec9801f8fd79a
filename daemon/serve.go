package daemon

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	sd "github.com/coreos/go-systemd/v22/daemon"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/attach-agent/attach-agent/container"
)

// Serve runs the daemon until ctx ends (main ends it on SIGTERM or
// SIGINT): it adopts the workers of an earlier daemon, serves the control
// API and /metrics, and then hands over (the default: it is gone within
// HandoverTimeout and its sessions go on) or drains (cfg.OnSIGTERM).
// Errors are a listener that cannot be had, or one that failed.
func Serve(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	log, err := NewLogger(cfg.LogFormat, cfg.stderr(), cfg.Journal)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	build := prometheus.NewGauge(prometheus.GaugeOpts{Name: "attach_agent_build_info", Help: "Build information; always 1.",
		ConstLabels: prometheus.Labels{"version": cfg.Version}})
	build.Set(1)
	reg.MustRegister(build)
	metrics := NewMetrics(reg)

	if os.Getpid() == 1 {
		// Orphans of sessions would be re-parented to us, and we reap only
		// our own workers.
		log.Warn("running as PID 1: orphaned processes of sessions will stay zombies; run under an init (docker run --init, tini)")
	}
	notify := func(state string) { _, _ = sd.SdNotify(false, state) } // best effort: no systemd, no-op
	cfg.onChange = func(n int) { notify(fmt.Sprintf("STATUS=%d active sessions", n)) }
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
				log.Info("SIGHUP: nothing to reload; sessions go on (SIGTERM hands them to the next daemon, `attach-agent drain` ends them)")
			case <-hupDone:
				return
			}
		}
	}()

	// The socket first: systemd's passed sockets are marked close-on-exec
	// here, before any worker is started.
	ln, err := controlListener(cfg.Control)
	if err != nil {
		return err
	}
	mgr, err := NewManager(cfg, log, metrics)
	if err != nil {
		_ = ln.Close()
		return err
	}
	// The sessions an earlier daemon left are ours now; then what agents
	// that are gone left in cgroups ends (never a live worker's).
	if adopted, reported := mgr.Adopt(); adopted+reported > 0 {
		log.Info("sessions taken over", "adopted", adopted, "reported_ended", reported)
	}
	if n := container.Sweep(); n > 0 {
		log.Warn("ended what a previous agent left behind", "cgroups", n)
	}
	access := cfg.Access
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
	api := &http.Server{Handler: NewAPI(mgr, access, cfg.ShutdownGrace), ConnContext: ConnContext, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- api.Serve(ln) }()
	var msrv *http.Server
	metricsAt := ""
	if cfg.MetricsListen != "" {
		mln, err := net.Listen("tcp", cfg.MetricsListen)
		if err != nil {
			_ = api.Close()
			mgr.Release()
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		metricsAt = mln.Addr().String()
		msrv = &http.Server{Handler: metricsMux(reg), ReadHeaderTimeout: 10 * time.Second}
		go func() { errc <- msrv.Serve(mln) }()
	}
	log.Info("attach-agent serving", "control", ln.Addr().String(), "metrics", metricsAt, "version", cfg.Version,
		"state_dir", cfg.StateDir, "on_sigterm", cfg.OnSIGTERM)
	notify(fmt.Sprintf("READY=1\nSTATUS=%d active sessions", mgr.Active()))
	stopWatchdog := watchdog(notify)
	defer stopWatchdog()

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)
	var failed error
	select {
	case <-ctx.Done():
	case err := <-errc:
		log.Error("listener failed", "err", err)
		failed = err
	}
	// The signal that ended the wait above reached sigs too: drop it, so
	// only a second one cuts a drain short.
	select {
	case <-sigs:
	default:
	}
	notify("STOPPING=1")
	if cfg.OnSIGTERM == OnSIGTERMDrain && failed == nil {
		log.Info("draining before exit", "active", mgr.Active(), "grace", cfg.ShutdownGrace.String())
		gctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-sigs:
				log.Warn("second signal: ending sessions now")
				cancel()
			case <-gctx.Done():
			}
		}()
		mgr.Drain(gctx, cfg.ShutdownGrace)
		cancel()
	}
	// Handover: the API stops (socket activation keeps the socket, so
	// calls wait for the next daemon), the workers go on.
	hctx, hcancel := context.WithTimeout(context.Background(), HandoverTimeout/2)
	defer hcancel()
	_ = api.Shutdown(hctx) // waits for calls in flight, a long ?wait= at most this long
	_ = api.Close()
	if msrv != nil {
		_ = msrv.Close()
	}
	active := mgr.Active()
	mgr.Release()
	log.Info("stopped: sessions handed over", "active", active)
	return failed
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
	d, err := sd.SdWatchdogEnabled(false)
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
