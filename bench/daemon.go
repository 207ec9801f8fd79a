package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/tlsdial"
)

// setupGap paces the daemon setup test: long enough for a taken spare
// worker to be replaced (its start and warm-up) before the next session.
const setupGap = 300 * time.Millisecond

// daemon is one `attach-agent serve` (of a given binary) run by the bench,
// driven through its control socket as the lifecycle manager drives it.
type daemon struct {
	name    string
	cmd     *exec.Cmd
	control string
	state   string // its --state-dir, removed by stop
	cgroup  string // a cgroup2 group of its own (cpu), "" without one
	hc      *http.Client
}

// stateParent is where daemons keep their state: a tmpfs, as /run is on
// the hosts the unit is for (systemd mounts it so), rather than this
// machine's disk, where a directory or file costs a journal write; "" (the
// bench's own directory) when /dev/shm is not a tmpfs.
func stateParent() string {
	var st unix.Statfs_t
	if unix.Statfs("/dev/shm", &st) == nil && st.Type == unix.TMPFS_MAGIC {
		return "/dev/shm"
	}
	return ""
}

func (e *env) startDaemon(name, bin string) (*daemon, error) {
	dir, err := os.MkdirTemp(e.dir, "serve-")
	if err != nil {
		return nil, err
	}
	d := &daemon{name: name, control: filepath.Join(dir, "control.sock")}
	log, err := os.Create(filepath.Join(dir, "serve.log"))
	if err != nil {
		return nil, err
	}
	defer log.Close()
	// --state-dir is passed only to a binary that knows it (before the
	// worker processes, serve had none).
	args := []string{"serve", "--ca", e.caFile, "--control", d.control, "--metrics-listen", "", "--log-format", "text", "--max-sessions", "2000", "--shutdown-grace", "5s"}
	if out, _ := exec.Command(bin, "serve", "-h").CombinedOutput(); strings.Contains(string(out), "-state-dir") {
		parent := stateParent()
		if parent == "" {
			parent = dir
		}
		if d.state, err = os.MkdirTemp(parent, "attach-bench-state-"); err != nil {
			return nil, err
		}
		args = append(args, "--state-dir", d.state)
	}
	d.cmd = exec.Command(bin, args...)
	d.cmd.Stderr = log
	// A session of its own, as systemd starts a service: the scheduler
	// then shares the CPU between it (its autogroup) and this bench's
	// relay and clients as it would on a host, whatever the daemon's
	// workers do (each is in a session of its own too).
	// Pdeathsig: Ctrl-C on the bench reaches it no longer, so its end does.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGTERM}
	if mnt := cgroup2Mount(); mnt != "" {
		// Started in a group of its own, so that what it and its
		// children (workers, commands) cost is read from its cpu.stat.
		g := filepath.Join(mnt, fmt.Sprintf("attach-bench-%d-%s", os.Getpid(), filepath.Base(dir)))
		if err := os.Mkdir(g, 0o755); err == nil {
			if f, err := os.Open(g); err == nil {
				defer f.Close()
				d.cgroup = g
				d.cmd.SysProcAttr.UseCgroupFD, d.cmd.SysProcAttr.CgroupFD = true, int(f.Fd())
			}
		}
	}
	if err := d.cmd.Start(); err != nil {
		if d.state != "" {
			_ = os.RemoveAll(d.state)
		}
		if d.cgroup != "" {
			_ = os.Remove(d.cgroup)
		}
		return nil, err
	}
	d.hc = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", d.control)
	}}, Timeout: 5 * time.Minute}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if resp, err := d.hc.Get("http://agent/healthz"); err == nil {
			resp.Body.Close()
			return d, nil
		}
		if time.Now().After(deadline) {
			d.stop()
			return nil, fmt.Errorf("%s: serve did not answer (log in %s)", bin, log.Name())
		}
	}
}

// stop drains the daemon (every session ends) and stops it.
func (d *daemon) stop() {
	if resp, err := d.hc.Post("http://agent/v1/drain", "application/json", strings.NewReader(`{"grace":"0s"}`)); err == nil {
		resp.Body.Close()
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	_ = d.cmd.Wait()
	if d.state != "" {
		_ = os.RemoveAll(d.state)
	}
	if d.cgroup != "" {
		// Its workers exit at the drain; the group goes once they have.
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			if b, err := os.ReadFile(filepath.Join(d.cgroup, "cgroup.procs")); err != nil || len(b) == 0 {
				break
			}
		}
		_ = os.Remove(d.cgroup)
	}
}

// cgroup2Mount is where a cgroup2 hierarchy is mounted (/sys/fs/cgroup,
// or /sys/fs/cgroup/unified beside v1 ones), "" when none is.
func cgroup2Mount() string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(line, " - ")
		if f, g := strings.Fields(pre), strings.Fields(post); ok && len(f) >= 5 && len(g) > 0 && g[0] == "cgroup2" {
			return f[4]
		}
	}
	return ""
}

// cpu is the CPU time the daemon's group has used: it, its workers and
// their commands.
func (d *daemon) cpu() (time.Duration, error) {
	b, err := os.ReadFile(filepath.Join(d.cgroup, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "usage_usec "); ok {
			us, err := strconv.ParseInt(v, 10, 64)
			return time.Duration(us) * time.Microsecond, err
		}
	}
	return 0, fmt.Errorf("%s: no usage_usec in cpu.stat", d.cgroup)
}

// sessionCPU is the CPU one session costs its daemon's group, all in:
// command runs through d with a client attached that reads to the end;
// the count ends once the daemon has seen the session end and a spare
// worker started meanwhile has had setupGap to be made.
func (e *env) sessionCPU(d *daemon, command string) (float64, error) {
	if d.cgroup == "" {
		return 0, errors.New("no cgroup2 hierarchy to count a daemon's CPU in")
	}
	c0, err := d.cpu()
	if err != nil {
		return 0, err
	}
	u := e.url()
	v, err := d.post(u, command)
	if err != nil {
		return 0, err
	}
	c, err := e.client(u)
	if err != nil {
		return 0, err
	}
	_, err = io.Copy(io.Discard, c)
	_ = c.Close()
	if err != nil {
		return 0, err
	}
	resp, err := d.hc.Get(fmt.Sprintf("http://agent/v1/sessions/%v?wait=30s", v["id"]))
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	time.Sleep(setupGap)
	c1, err := d.cpu()
	return float64(c1-c0) / float64(time.Millisecond), err
}

// post starts a session for u running command in a raw pty.
func (d *daemon) post(u tlsdial.URL, command string) (map[string]any, error) {
	frag := ""
	if u.V2 {
		frag = "#v2"
	}
	body := fmt.Sprintf(`{"attach_url": "rendezvous://%s/%s%s", "command": %q, "raw": true}`, u.Addr(), u.Secret, frag, command)
	resp, err := d.hc.Post("http://agent/v1/sessions", "application/json", strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var v map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusCreated {
		return nil, fmt.Errorf("POST: %d %v", resp.StatusCode, v)
	}
	return v, nil
}

// daemonSetup times one session from the API call to the first output
// byte at a client already waiting at the relay.
func (e *env) daemonSetup(d *daemon) (time.Duration, error) {
	u := e.url()
	paired := e.waitingClient(u)
	t0 := time.Now()
	if _, err := d.post(u, "echo x"); err != nil {
		return 0, err
	}
	c, err := paired()
	if err != nil {
		return 0, err
	}
	defer c.Close()
	b := make([]byte, 1)
	_, err = io.ReadFull(c, b)
	return time.Since(t0), err
}

// attached starts command through d and pairs a client with it.
func (e *env) attached(d *daemon, command string) (*tlsdial.Conn, error) {
	u := e.url()
	if _, err := d.post(u, command); err != nil {
		return nil, err
	}
	return e.client(u)
}

func (e *env) daemonDownload(d *daemon, size int64) (float64, error) {
	c, err := e.attached(d, fmt.Sprintf("head -c %d /dev/zero", size))
	if err != nil {
		return 0, err
	}
	defer c.Close()
	t0 := time.Now()
	n, err := io.Copy(io.Discard, c)
	if err != nil || n != size {
		return 0, fmt.Errorf("download: %d of %d bytes: %v", n, size, err)
	}
	return float64(size) / (1 << 20) / time.Since(t0).Seconds(), nil
}

func (e *env) daemonEcho(d *daemon, size int64) (float64, error) {
	c, err := e.attached(d, "cat")
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return echoThrough(c, size)
}

func (e *env) daemonLatency(d *daemon, trips int) (p50, p99 time.Duration, err error) {
	c, err := e.attached(d, "cat")
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	return roundTrips(c, trips)
}

// pss is a process's proportional set size in KiB (shared pages divided
// among the processes that map them), from smaps_rollup.
func pss(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && k == "Pss" {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("pid %d: no Pss", pid)
}

// idleMemory starts n idle sessions (cat, a client attached, nothing
// moving) and returns the PSS they add: the daemon's growth, and the sum
// over the sessions' workers (none when sessions run in the daemon).
func (e *env) idleMemory(d *daemon, n int) (daemonKiB, workersKiB int64, workers int, err error) {
	before, err := pss(d.cmd.Process.Pid)
	if err != nil {
		return 0, 0, 0, err
	}
	avail0 := memAvailable()
	fds0 := countDir(fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid))
	var conns []*tlsdial.Conn
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	for range n {
		c, err := e.attached(d, "cat")
		if err != nil {
			return 0, 0, 0, err
		}
		conns = append(conns, c)
	}
	time.Sleep(3 * time.Second) // settled: every session paired and idle, its worker past its start (startBound)
	after, err := pss(d.cmd.Process.Pid)
	if err != nil {
		return 0, 0, 0, err
	}
	resp, err := d.hc.Get("http://agent/v1/sessions")
	if err != nil {
		return 0, 0, 0, err
	}
	var list struct {
		Sessions []struct {
			State     string `json:"state"`
			WorkerPID int    `json:"worker_pid"`
		} `json:"sessions"`
	}
	err = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if err != nil {
		return 0, 0, 0, err
	}
	fds, threads := 0, 0
	for _, s := range list.Sessions {
		if s.State != "running" || s.WorkerPID == 0 {
			continue
		}
		k, err := pss(s.WorkerPID)
		if err != nil {
			return 0, 0, 0, err
		}
		workersKiB += k
		workers++
		fds += countDir(fmt.Sprintf("/proc/%d/fd", s.WorkerPID))
		threads += countDir(fmt.Sprintf("/proc/%d/task", s.WorkerPID))
	}
	fmt.Printf("    host MemAvailable -%d MiB for %d sessions (everything: daemon, workers, commands, kernel, and this bench's relay and clients)\n",
		(avail0-memAvailable())>>10, n)
	fmt.Printf("    daemon fds +%d; per worker: %.1f fds, %.1f threads\n",
		countDir(fmt.Sprintf("/proc/%d/fd", d.cmd.Process.Pid))-fds0, float64(fds)/float64(max(workers, 1)), float64(threads)/float64(max(workers, 1)))
	return after - before, workersKiB, workers, nil
}

// benchDaemons compares serve binaries (before and after a change), in
// one run: setup from the API call, download, echo-bulk and latency
// through each, alternating, and the memory of idle sessions.
func (e *env) benchDaemons(bins []string, tests map[string]bool, setups, downloadMiB, echoMiB, trips, rounds, idle int) error {
	if len(bins) != 2 {
		return fmt.Errorf("-serve: want two attach-agent binaries, BEFORE,AFTER (go build -o DIR/NAME ./cmd/attach-agent at each commit)")
	}
	var ds [2]*daemon
	defer func() {
		for _, d := range ds {
			if d != nil {
				d.stop()
			}
		}
	}()
	for i, b := range bins {
		d, err := e.startDaemon(filepath.Base(filepath.Dir(b))+"/"+filepath.Base(b), b)
		if err != nil {
			return err
		}
		ds[i] = d
	}
	label := func(i int) string { return fmt.Sprintf("%-32s", ds[i].name+" ("+[]string{"before", "after"}[i]+")") }
	labels := [2]string{label(0), label(1)}
	if tests["setup"] {
		// Paced, as sessions arrive on a host that is not saturated (a
		// spare worker has been made again by the next one), and back to
		// back, a burst (what a host of this size sustains).
		for _, gap := range []time.Duration{setupGap, 0} {
			what := fmt.Sprintf("one every %v", gap)
			if gap == 0 {
				what = "back to back"
			}
			m := measure{
				name:   fmt.Sprintf("daemon setup, %s (API call to the first output byte at a waiting client, ms)", what),
				target: "target <= 1.10",
				run: func(v int) (float64, error) {
					time.Sleep(gap)
					d, err := e.daemonSetup(ds[v])
					return float64(d) / float64(time.Millisecond), err
				},
			}
			got, steal, err := inRounds(setups, []measure{m})
			if err != nil {
				return err
			}
			report(m, labels, got[0], steal)
		}
	}
	var ms []measure
	if tests["download"] {
		ms = append(ms, measure{fmt.Sprintf("daemon download (%d MiB, raw pty, MiB/s at the client)", downloadMiB), "within noise: 1.0", func(v int) (float64, error) {
			return e.daemonDownload(ds[v], int64(downloadMiB)<<20)
		}})
	}
	if tests["echo"] {
		ms = append(ms, measure{fmt.Sprintf("daemon echo-bulk (%d MiB, raw pty, MiB/s at the client)", echoMiB), "within noise: 1.0", func(v int) (float64, error) {
			return e.daemonEcho(ds[v], int64(echoMiB)<<20)
		}})
	}
	if tests["latency"] {
		n := max(trips/rounds, 100)
		ms = append(ms, measure{fmt.Sprintf("daemon latency p50 (%d one-byte round trips through cat per round, raw pty, µs)", n), "within noise: 1.0", func(v int) (float64, error) {
			p50, _, err := e.daemonLatency(ds[v], n)
			return float64(p50) / float64(time.Microsecond), err
		}})
	}
	if tests["cpu"] {
		ms = append(ms, measure{"CPU of a session running `echo x` (the daemon, its worker, the command, the spare made after; ms)", "before the worker processes: 1.0", func(v int) (float64, error) {
			return e.sessionCPU(ds[v], "echo x")
		}}, measure{fmt.Sprintf("CPU of a session downloading %d MiB (the same; ms)", downloadMiB), "within noise: 1.0", func(v int) (float64, error) {
			return e.sessionCPU(ds[v], fmt.Sprintf("head -c %d /dev/zero", int64(downloadMiB)<<20))
		}})
	}
	if len(ms) > 0 {
		got, steal, err := inRounds(rounds, ms)
		if err != nil {
			return err
		}
		for i, m := range ms {
			report(m, labels, got[i], steal)
		}
	}
	if tests["pss"] {
		fmt.Printf("memory of %d idle sessions (cat, client attached; PSS in KiB, shared pages divided among their users)\n", idle)
		for i := range 2 {
			dk, wk, nw, err := e.idleMemory(ds[i], idle)
			if err != nil {
				return err
			}
			per := float64(dk+wk) / float64(idle) / 1024
			fmt.Printf("  %s daemon +%d, %d workers %d: %.2f MiB per session", label(i), dk, nw, wk, per)
			if nw > 0 {
				fmt.Printf(" (target <= 3)")
			}
			fmt.Println()
			// End them before the next daemon's turn.
			ds[i].stop()
			ds[i] = nil
		}
		fmt.Println()
	}
	return nil
}

// memAvailable is /proc/meminfo's MemAvailable, in KiB.
func memAvailable() int64 {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == "MemAvailable" {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

func countDir(dir string) int {
	ents, _ := os.ReadDir(dir)
	return len(ents)
}
