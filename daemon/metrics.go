package daemon

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
)

// Metrics are the agent's Prometheus metrics. Every label value is from a
// closed set created up front; no session id, address or secret is ever a
// label.
type Metrics struct {
	Active          prometheus.Gauge
	Ended           *prometheus.CounterVec // reason
	Exits           *prometheus.CounterVec // class: success, failure, signal
	Bytes           *prometheus.CounterVec // direction: in (client -> process), out
	TLSHandshake    prometheus.Histogram
	Dial            prometheus.Histogram
	FirstByte       prometheus.Histogram
	DialAttempts    *prometheus.CounterVec // result: success, failure
	SessionDuration prometheus.Histogram
	SlowHandshakes  prometheus.Counter
	EmptyReads      prometheus.Counter
	Spawn           *prometheus.HistogramVec // place: host, join, sandbox
	MaxSessions     prometheus.Gauge         // the daemon's --max-sessions, for capacity alerts
	Adopted         prometheus.Counter       // sessions taken over from an earlier daemon
	WorkerFailures  prometheus.Counter       // workers that could not be started or set up
}

// NewMetrics creates the metrics and registers them with reg (never the
// global registry: pass the daemon's own).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	latency := []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}
	m := &Metrics{
		Active: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "attach_agent_sessions_active", Help: "Sessions running now (dialing, waiting for a client, or attached).",
		}),
		Ended: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attach_agent_sessions_ended_total", Help: "Sessions ended, by end reason.",
		}, []string{"reason"}),
		Exits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attach_agent_session_exits_total", Help: "Commands that ran and ended, by exit class (success, failure, signal).",
		}, []string{"class"}),
		Bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attach_agent_bytes_total", Help: "Payload bytes moved, by direction (in: client to process, out: process to client).",
		}, []string{"direction"}),
		TLSHandshake: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "attach_agent_tls_handshake_duration_seconds", Help: "TLS handshake with the relay (the attempt that succeeded).", Buckets: latency,
		}),
		Dial: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "attach_agent_dial_duration_seconds", Help: "From the first connect attempt to TLS up, retries included.", Buckets: latency,
		}),
		FirstByte: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "attach_agent_attach_to_first_byte_seconds", Help: "From the session's start to its first output byte sent to the client.", Buckets: latency,
		}),
		DialAttempts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "attach_agent_dial_attempts_total", Help: "Connect attempts to the relay, by result.",
		}, []string{"result"}),
		SessionDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "attach_agent_session_duration_seconds", Help: "Whole sessions, start to end.",
			Buckets: []float64{.1, .5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600},
		}),
		SlowHandshakes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attach_agent_slow_handshakes_total", Help: "Relay dials whose connect plus TLS took longer than the slow threshold.",
		}),
		EmptyReads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attach_agent_reads_without_progress_total", Help: "Reads that returned neither bytes nor an error (bounded, never spun on).",
		}),
		Spawn: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "attach_agent_spawn_duration_seconds", Help: "Starting the command once a client is there (user lookup, namespaces, sandbox setup), by where it runs.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}, []string{"place"}),
		MaxSessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "attach_agent_sessions_max", Help: "Sessions the daemon runs at once at most (--max-sessions); more get 429.",
		}),
		Adopted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attach_agent_sessions_adopted_total", Help: "Live sessions taken over from an earlier daemon at start (a restart or upgrade kept them).",
		}),
		WorkerFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "attach_agent_worker_start_failures_total", Help: "Session worker processes that could not be started, set up or handed their session.",
		}),
	}
	for _, r := range agent.Reasons {
		m.Ended.WithLabelValues(string(r))
	}
	for _, c := range []string{"success", "failure", "signal"} {
		m.Exits.WithLabelValues(c)
	}
	for _, d := range []string{"in", "out"} {
		m.Bytes.WithLabelValues(d)
	}
	for _, r := range []string{"success", "failure"} {
		m.DialAttempts.WithLabelValues(r)
	}
	for _, p := range container.Places {
		m.Spawn.WithLabelValues(p)
	}
	reg.MustRegister(m.Active, m.Ended, m.Exits, m.Bytes, m.TLSHandshake, m.Dial, m.FirstByte,
		m.DialAttempts, m.SessionDuration, m.SlowHandshakes, m.EmptyReads, m.Spawn, m.MaxSessions, m.Adopted, m.WorkerFailures)
	return m
}

// observe records a finished session that ran at place (host, join,
// sandbox). Nil-safe.
func (m *Metrics) observe(place string, r agent.Result) {
	if m == nil {
		return
	}
	if r.Timings.Spawn > 0 && place != "" {
		m.Spawn.WithLabelValues(place).Observe(r.Timings.Spawn.Seconds())
	}
	m.Ended.WithLabelValues(string(r.Reason)).Inc()
	if r.Started {
		switch {
		case r.Signal != 0:
			m.Exits.WithLabelValues("signal").Inc()
		case r.ExitCode == 0:
			m.Exits.WithLabelValues("success").Inc()
		default:
			m.Exits.WithLabelValues("failure").Inc()
		}
	}
	m.Bytes.WithLabelValues("in").Add(float64(r.BytesIn))
	m.Bytes.WithLabelValues("out").Add(float64(r.BytesOut))
	if r.Timings.Attempts > 0 || r.Reason == agent.ReasonDialFailed {
		ok := r.Reason != agent.ReasonDialFailed || r.Timings.TLS > 0
		fails := r.Timings.Attempts
		if ok {
			fails--
			m.DialAttempts.WithLabelValues("success").Inc()
			m.TLSHandshake.Observe(r.Timings.TLS.Seconds())
			m.Dial.Observe(r.Timings.Dial.Seconds())
		}
		m.DialAttempts.WithLabelValues("failure").Add(float64(max(fails, 0)))
	}
	if r.Timings.FirstOutput > 0 {
		m.FirstByte.Observe(r.Timings.FirstOutput.Seconds())
	}
	m.SessionDuration.Observe(r.Timings.Total.Seconds())
	if r.SlowDial {
		m.SlowHandshakes.Inc()
	}
	m.EmptyReads.Add(float64(r.Empty))
}
