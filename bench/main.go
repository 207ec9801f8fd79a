// Command bench measures attach-agent against a minimal reference agent and
// against the pty's own limits, all in one run on loopback, and prints a
// table of figures and ratios (docs/BENCHMARKS.md says how to read it).
//
//	go run ./bench                 # everything, default sizes
//	go run ./bench -download 64    # smaller download (MiB)
//	go run ./bench -rounds 5       # more rounds of download and echo-bulk
//	go run ./bench -serve OLD,NEW  # two attach-agent binaries' serve, compared
//	go run ./bench -v2 BIN         # protocol v2 against the Heroku wire, one serve
//
// The agents run as child processes (this binary re-executed), so their
// CPU time and peak RSS are theirs alone; the relay and the client run here.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

func main() {
	container.Main() // sessions of this binary could run in sandboxes: it is their init then
	if len(os.Args) > 1 && (os.Args[1] == "agent" || os.Args[1] == "agent-v2" || os.Args[1] == "ref") {
		code := child(os.Args[1], os.Args[2:])
		fmt.Printf("vmhwm_kib %d cpu_ns %d\n", vmHWM(), selfCPU())
		os.Exit(code)
	}
	downloadMiB := flag.Int("download", 256, "MiB the command writes in the download test")
	echoMiB := flag.Int("echo", 64, "MiB echoed through cat in the echo-bulk test")
	trips := flag.Int("trips", 2000, "one-byte round trips in the latency test (with -serve and -v2: in all, split among the rounds)")
	setups := flag.Int("setups", 20, "sessions in the setup test (with -serve: rounds, a session of each binary in each)")
	rounds := flag.Int("rounds", 3, "rounds of the download and echo-bulk tests, and with -serve and -v2 of latency (medians are reported; with -serve and -v2 also the median of per-round ratios)")
	only := flag.String("only", "download,echo,latency,setup,nagle", "the tests to run, comma-separated (download includes cost); with -serve: setup, download, echo, latency, pss, cpu")
	serve := flag.String("serve", "", "`BEFORE,AFTER`: two attach-agent binaries whose `serve` is compared, driven through the control API (sessions through each daemon, alternating)")
	idle := flag.Int("idle", 200, "idle sessions in the pss test")
	v2 := flag.String("v2", "", "an attach-agent `BINARY`: compare protocol v2 with the Heroku wire through its serve (download, echo, latency)")
	flag.Parse()
	if *rounds < 1 {
		fmt.Fprintln(os.Stderr, "bench: -rounds must be at least 1")
		os.Exit(2)
	}
	tests := map[string]bool{}
	for _, t := range strings.Split(*only, ",") {
		switch t {
		case "download", "echo", "latency", "setup", "nagle", "pss", "v2cost", "cpu":
			tests[t] = true
		default:
			fmt.Fprintf(os.Stderr, "bench: -only: unknown test %q: use download, echo, latency, setup, nagle, pss, v2cost and cpu, comma-separated\n", t)
			os.Exit(2)
		}
	}
	var err error
	if *v2 != "" {
		err = benchV2(*v2, tests, *downloadMiB, *echoMiB, *trips, *rounds)
	} else if *serve != "" {
		err = benchServe(strings.Split(*serve, ","), tests, *setups, *downloadMiB, *echoMiB, *trips, *rounds, *idle)
	} else {
		err = bench(tests, *downloadMiB, *echoMiB, *trips, *setups, *rounds)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type env struct {
	relay  *rendezvous.Relay
	caFile string
	dir    string
	dial   tlsdial.Config
	n      int
}

func (e *env) url() tlsdial.URL {
	e.n++
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return tlsdial.URL{Host: "127.0.0.1", Port: e.relay.Addr().(*net.TCPAddr).Port, Secret: hex.EncodeToString(b)}
}

// newEnv starts the relay on loopback and a temporary directory.
func newEnv() (*env, func(), error) {
	e := &env{relay: &rendezvous.Relay{}}
	if err := e.relay.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, nil, err
	}
	go func() { _ = e.relay.Serve() }()
	dir, err := os.MkdirTemp("", "attach-bench")
	if err != nil {
		_ = e.relay.Close()
		return nil, nil, err
	}
	cleanup := func() { _ = e.relay.Close(); _ = os.RemoveAll(dir) }
	e.dir, e.caFile = dir, dir+"/ca.pem"
	if err := os.WriteFile(e.caFile, e.relay.CAPEM(), 0o600); err != nil {
		cleanup()
		return nil, nil, err
	}
	e.dial = tlsdial.Config{TLS: &tls.Config{RootCAs: e.relay.Certs().CAPool}, DialTimeout: 10 * time.Second, PairTimeout: 30 * time.Second}
	return e, cleanup, nil
}

// benchServe compares two binaries' serve (see benchDaemons).
func benchServe(bins []string, tests map[string]bool, setups, downloadMiB, echoMiB, trips, rounds, idle int) error {
	e, cleanup, err := newEnv()
	if err != nil {
		return err
	}
	defer cleanup()
	fmt.Printf("attach-agent serve, before and after (%s)\n\n", time.Now().UTC().Format(time.RFC3339))
	return e.benchDaemons(bins, tests, setups, downloadMiB, echoMiB, trips, rounds, idle)
}

func bench(tests map[string]bool, downloadMiB, echoMiB, trips, setups, rounds int) error {
	// The bench kills agents (it ends echo and latency sessions so); end
	// what their sessions' cgroups still hold once all of them are gone.
	defer container.Sweep()
	e, cleanup, err := newEnv()
	if err != nil {
		return err
	}
	defer cleanup()

	size := int64(downloadMiB) << 20
	dlCmd := fmt.Sprintf("head -c %d /dev/zero", size)
	fmt.Printf("attach-agent benchmarks (%s)\n\n", time.Now().UTC().Format(time.RFC3339))

	// Download and echo-bulk: the pty's throughput on a shared 2-core
	// machine swings by 2x between runs, so each is measured in rounds, the
	// limit and both agents back to back in each (in a rotating order), and
	// ratios are taken within a round; the medians are reported.
	type dlRound struct {
		limit, agent, ref             float64
		limitCPU                      time.Duration
		polled                        float64 // the pty read by a polling reader
		polledCPU                     time.Duration
		agentDL, refDL                download
		echoLimit, echoAgent, echoRef float64
	}
	echoSize := int64(echoMiB) << 20
	var rs []dlRound
	for r := range rounds {
		var rd dlRound
		steps := []func() error{
			func() error {
				cpu0 := selfCPU()
				v, err := ptyOneWay(size, false)
				rd.limit, rd.limitCPU = v, selfCPU()-cpu0
				if err != nil {
					return err
				}
				cpu0 = selfCPU()
				v, err = ptyOneWay(size, true)
				rd.polled, rd.polledCPU = v, selfCPU()-cpu0
				return err
			},
			func() (err error) { rd.agentDL, err = e.download("agent", dlCmd, size); return err },
			func() (err error) { rd.refDL, err = e.download("ref", dlCmd, size); return err },
			func() (err error) { rd.echoLimit, err = ptyEchoLimit(echoSize); return err },
			func() (err error) { rd.echoAgent, err = e.echoBulk("agent", echoSize); return err },
			func() (err error) { rd.echoRef, err = e.echoBulk("ref", echoSize); return err },
		}
		var groups []int
		if tests["download"] {
			groups = append(groups, 0)
		}
		if tests["echo"] {
			groups = append(groups, 3)
		}
		for i := range 3 { // rotate who goes first within each group of three
			for _, g := range groups {
				if err := steps[g+(i+r)%3](); err != nil {
					return fmt.Errorf("round %d: %w", r+1, err)
				}
			}
		}
		rd.agent, rd.ref = rd.agentDL.mibps, rd.refDL.mibps
		rs = append(rs, rd)
	}
	med := func(f func(dlRound) float64) float64 {
		v := make([]float64, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	spread := func(f func(dlRound) float64) string {
		lo, hi := f(rs[0]), f(rs[0])
		for _, r := range rs {
			lo, hi = min(lo, f(r)), max(hi, f(r))
		}
		return fmt.Sprintf("%.2f-%.2f", lo, hi)
	}
	per := func(d time.Duration) float64 { return d.Seconds() * float64(256<<20) / float64(size) }
	if tests["download"] {
		fmt.Printf("download (%d MiB into a raw pty, MiB/s at the client; median of %d rounds, ratios within a round)\n", downloadMiB, rounds)
		fmt.Printf("  pty one-way limit (no network)   %8.1f\n", med(func(r dlRound) float64 { return r.limit }))
		fmt.Printf("  pty, polling reader (no network) %8.1f\n", med(func(r dlRound) float64 { return r.polled }))
		fmt.Printf("  reference agent                  %8.1f\n", med(func(r dlRound) float64 { return r.ref }))
		vsRef := func(r dlRound) float64 { return r.agent / r.ref }
		vsLim := func(r dlRound) float64 { return r.agent / r.limit }
		fmt.Printf("  attach-agent                     %8.1f   %.2fx reference [%s] (target >= 1.30), %.2fx pty limit [%s] (target >= 0.85)\n",
			med(func(r dlRound) float64 { return r.agent }), med(vsRef), spread(vsRef), med(vsLim), spread(vsLim))
		vsPolled := func(r dlRound) float64 { return r.agent / r.polled }
		fmt.Printf("  %33s%.2fx the polling reader [%s]\n\n", "", med(vsPolled), spread(vsPolled))

		fmt.Printf("cost (agent process, per 256 MiB downloaded; median of %d rounds)\n", rounds)
		cpuRatio := func(r dlRound) float64 { return r.agentDL.cpu.Seconds() / r.refDL.cpu.Seconds() }
		fmt.Printf("  bare pty reader (no network)     %8.3f CPU s\n", med(func(r dlRound) float64 { return per(r.limitCPU) }))
		fmt.Printf("  polling pty reader (no network)  %8.3f CPU s\n", med(func(r dlRound) float64 { return per(r.polledCPU) }))
		fmt.Printf("  reference agent                  %8.3f CPU s   peak RSS %6.1f MiB\n",
			med(func(r dlRound) float64 { return per(r.refDL.cpu) }), med(func(r dlRound) float64 { return float64(r.refDL.rssKiB) / 1024 }))
		fmt.Printf("  attach-agent                     %8.3f CPU s   peak RSS %6.1f MiB   %.2fx reference CPU [%s] (target <= 0.65)\n",
			med(func(r dlRound) float64 { return per(r.agentDL.cpu) }), med(func(r dlRound) float64 { return float64(r.agentDL.rssKiB) / 1024 }),
			med(cpuRatio), spread(cpuRatio))
		fmt.Printf("  relay and client, with reference %8.3f CPU s\n", med(func(r dlRound) float64 { return per(r.refDL.relayCPU) }))
		fmt.Printf("  relay and client, with ours      %8.3f CPU s\n\n", med(func(r dlRound) float64 { return per(r.agentDL.relayCPU) }))
	}
	if tests["echo"] {
		echoVsLim := func(r dlRound) float64 { return r.echoAgent / r.echoLimit }
		fmt.Printf("echo-bulk (%d MiB random through cat on a raw pty, sha256 checked, MiB/s; median of %d rounds)\n", echoMiB, rounds)
		fmt.Printf("  pty echo limit (no network)      %8.1f\n", med(func(r dlRound) float64 { return r.echoLimit }))
		fmt.Printf("  reference agent                  %8.1f\n", med(func(r dlRound) float64 { return r.echoRef }))
		fmt.Printf("  attach-agent                     %8.1f   %.2fx pty echo limit [%s] (target >= 0.90)\n\n",
			med(func(r dlRound) float64 { return r.echoAgent }), med(echoVsLim), spread(echoVsLim))
	}
	if tests["v2cost"] {
		// The agent's own CPU time (its rusage, not the machine's wall
		// clock) per 256 MiB downloaded, the Heroku wire against v2 frames,
		// alternating: framing's cost, which a busy machine's noise does
		// not hide as it hides throughput.
		var v1, v2, v1rate, v2rate []float64
		for r := range rounds * 2 {
			for k := range 2 {
				mode := []string{"agent", "agent-v2"}[(r+k)%2]
				dl, err := e.download(mode, dlCmd, size)
				if err != nil {
					return fmt.Errorf("v2cost %s: %w", mode, err)
				}
				if mode == "agent" {
					v1, v1rate = append(v1, per(dl.cpu)), append(v1rate, dl.mibps)
				} else {
					v2, v2rate = append(v2, per(dl.cpu)), append(v2rate, dl.mibps)
				}
			}
		}
		fmt.Printf("framing cost (agent CPU s per 256 MiB downloaded into a raw pty; median of %d each, alternating)\n", len(v1))
		fmt.Printf("  Heroku wire (v1)                 %8.3f CPU s   %6.1f MiB/s\n", median(v1), median(v1rate))
		fmt.Printf("  protocol v2                      %8.3f CPU s   %6.1f MiB/s   CPU %.2fx v1, throughput %.2fx v1\n\n",
			median(v2), median(v2rate), median(v2)/median(v1), median(v2rate)/median(v1rate))
		var c1, c2 []float64
		for r := range rounds * 2 {
			for k := range 2 {
				v := (r + k) % 2
				us, err := e.tripCPU([]string{"agent", "agent-v2"}[v], trips)
				if err != nil {
					return err
				}
				if v == 0 {
					c1 = append(c1, us)
				} else {
					c2 = append(c2, us)
				}
			}
		}
		fmt.Printf("framing cost per round trip (agent CPU µs per one-byte echo through dd bs=1, %d trips; median of %d each)\n", trips, len(c1))
		fmt.Printf("  Heroku wire (v1)                 %8.1f µs\n", median(c1))
		fmt.Printf("  protocol v2                      %8.1f µs   %.2fx v1\n\n", median(c2), median(c2)/median(c1))
	}
	if tests["latency"] {
		var lat [2][2]time.Duration
		for i, mode := range []string{"agent", "ref"} {
			p50, p99, err := e.latency(mode, trips)
			if err != nil {
				return fmt.Errorf("latency %s: %w", mode, err)
			}
			lat[i] = [2]time.Duration{p50, p99}
		}
		fmt.Printf("latency (%d one-byte round trips through cat, raw pty)\n", trips)
		fmt.Printf("  reference agent                  p50 %8v   p99 %8v\n", lat[1][0], lat[1][1])
		fmt.Printf("  attach-agent                     p50 %8v   p99 %8v   %.2fx / %.2fx reference (target <= 1)\n\n",
			lat[0][0], lat[0][1], float64(lat[0][0])/float64(lat[1][0]), float64(lat[0][1])/float64(lat[1][1]))
	}
	if tests["setup"] {
		// Alternating, so that the machine's drift over the run falls on
		// both alike.
		modes := []string{"agent", "ref"}
		st, err := alternating(setups, func(m int) (time.Duration, error) { return e.setup(modes[m]) })
		if err != nil {
			return fmt.Errorf("setup: %w", err)
		}
		fmt.Printf("setup (agent process start to first output byte at a waiting client, median of %d each, alternating)\n", setups)
		fmt.Printf("  reference agent                  %8v\n", st[1])
		fmt.Printf("  attach-agent                     %8v   %.2fx reference (target <= 1)\n", st[0], float64(st[0])/float64(st[1]))
	}
	if tests["nagle"] {
		// A client's setup (connect, TLS, secret, ack) with its partner
		// already waiting: Go's client (TCP_NODELAY) and one with Nagle's
		// algorithm on, as Python's ssl module is, alternating.
		st, err := alternating(setups, func(m int) (time.Duration, error) { return e.clientSetup(m == 1) })
		if err != nil {
			return fmt.Errorf("client setup: %w", err)
		}
		fmt.Printf("client setup through the relay, partner waiting (median of %d each, alternating)\n", setups)
		fmt.Printf("  TCP_NODELAY (Go's client)        %8v\n", st[0])
		fmt.Printf("  Nagle on (Python's ssl client)   %8v   %.2fx (target <= 1.1)\n", st[1], float64(st[1])/float64(st[0]))
	}
	return nil
}

// alternating runs f for two variants (0 and 1) n times each, in the
// order 0 1 1 0 0 1 ..., so that the machine's drift falls on both alike,
// and returns each one's median.
func alternating(n int, f func(variant int) (time.Duration, error)) ([2]time.Duration, error) {
	var d [2][]time.Duration
	var med [2]time.Duration
	for i := range 2 * n {
		m := (i + i/2) % 2
		v, err := f(m)
		if err != nil {
			return med, err
		}
		d[m] = append(d[m], v)
	}
	for m := range d {
		sort.Slice(d[m], func(i, j int) bool { return d[m][i] < d[m][j] })
		med[m] = d[m][len(d[m])/2]
	}
	return med, nil
}

// clientSetup times one client's connect, TLS handshake, secret line and
// ack, with its partner already waiting; nagle leaves Nagle's algorithm on.
func (e *env) clientSetup(nagle bool) (time.Duration, error) {
	u := e.url()
	waiter := make(chan error, 1)
	go func() {
		c, err := e.client(u)
		if err == nil {
			_ = c.Close()
		}
		waiter <- err
	}()
	for e.relay.Waiting() == 0 {
		time.Sleep(time.Millisecond)
	}
	t0 := time.Now()
	raw, err := net.DialTimeout("tcp", u.Addr(), 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer raw.Close()
	if err := raw.(*net.TCPConn).SetNoDelay(!nagle); err != nil {
		return 0, err
	}
	tc := tls.Client(raw, &tls.Config{RootCAs: e.dial.TLS.RootCAs, ServerName: u.Host})
	_ = tc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := tc.Handshake(); err != nil {
		return 0, err
	}
	if _, err := io.WriteString(tc, u.Secret+"\r\n"); err != nil {
		return 0, err
	}
	ack := make([]byte, len(wire.Ack))
	if _, err := io.ReadFull(tc, ack); err != nil {
		return 0, err
	}
	el := time.Since(t0)
	_ = tc.Close()
	return el, <-waiter
}

// startAgent runs this binary as an agent (ours or the reference) for u.
func (e *env) startAgent(mode string, u tlsdial.URL, command string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	// Through a link named for the agent, so that its process name (in
	// top, ps, perf) tells the two apart.
	link := e.dir + "/" + map[string]string{"agent": "attach-agent", "agent-v2": "attach-agent-v2", "ref": "reference"}[mode]
	if _, err := os.Lstat(link); err != nil {
		if err := os.Symlink(self, link); err != nil {
			return nil, err
		}
	}
	cmd := exec.Command(link, mode, e.caFile, strconv.Itoa(u.Port), u.Secret, command)
	cmd.Stderr = os.Stderr
	cmd.Stdout = new(bytes.Buffer) // the child's peak RSS (see child)
	return cmd, cmd.Start()
}

// waitingClient starts a client for u and returns once it waits at the
// relay; paired then gives its connection once the agent's side came.
func (e *env) waitingClient(u tlsdial.URL) (paired func() (*tlsdial.Conn, error)) {
	cc := make(chan *tlsdial.Conn, 1)
	ce := make(chan error, 1)
	before := e.relay.Waiting()
	go func() {
		c, err := e.client(u)
		if err != nil {
			ce <- err
			return
		}
		cc <- c
	}()
	for deadline := time.Now().Add(10 * time.Second); e.relay.Waiting() <= before; time.Sleep(time.Millisecond) {
		select {
		case err := <-ce:
			return func() (*tlsdial.Conn, error) { return nil, err }
		default:
		}
		if time.Now().After(deadline) {
			return func() (*tlsdial.Conn, error) { return nil, errors.New("the client never waited at the relay") }
		}
	}
	return func() (*tlsdial.Conn, error) {
		select {
		case c := <-cc:
			return c, nil
		case err := <-ce:
			return nil, err
		}
	}
}

// client pairs as the user's side.
func (e *env) client(u tlsdial.URL) (*tlsdial.Conn, error) {
	c, err := tlsdial.Dial(context.Background(), u, e.dial)
	if err != nil {
		return nil, err
	}
	if err := c.Pair(context.Background(), u.Secret, 30*time.Second); err != nil {
		_ = c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Minute))
	return c, nil
}

type download struct {
	mibps    float64
	cpu      time.Duration // the agent's
	relayCPU time.Duration // this process's: the relay and the client
	rssKiB   int64
}

func (e *env) download(mode, command string, size int64) (download, error) {
	u := e.url()
	cmd, err := e.startAgent(mode, u, command)
	if err != nil {
		return download{}, err
	}
	c, err := e.client(u)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return download{}, err
	}
	defer c.Close()
	t0, cpu0 := time.Now(), selfCPU()
	var n int64
	if mode == "agent-v2" {
		n, err = stdoutFrames(c, wire.NewFrameReader(c), io.Discard, -1)
		_ = c.CloseWrite() // the agent lingers for the client's end
		_, _ = io.Copy(io.Discard, c)
	} else {
		n, err = io.Copy(io.Discard, c)
	}
	el, relayCPU := time.Since(t0), selfCPU()-cpu0
	_ = c.Close()
	werr := cmd.Wait()
	if err != nil || n != size {
		return download{}, fmt.Errorf("got %d of %d bytes: %v (agent: %v)", n, size, err, werr)
	}
	rss, cpu, err := ownUsage(cmd)
	if err != nil {
		return download{}, err
	}
	return download{
		mibps:    float64(size) / (1 << 20) / el.Seconds(),
		cpu:      cpu,
		relayCPU: relayCPU,
		rssKiB:   rss,
	}, nil
}

func (e *env) echoBulk(mode string, size int64) (float64, error) {
	u := e.url()
	cmd, err := e.startAgent(mode, u, "cat")
	if err != nil {
		return 0, err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	c, err := e.client(u)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return echoThrough(c, size)
}

// echoThrough writes size random bytes to c (an echo at the other end)
// while reading them back, checks them (sha256) and returns MiB/s.
func echoThrough(c io.ReadWriter, size int64) (float64, error) {
	data := make([]byte, size)
	_, _ = rand.Read(data)
	t0 := time.Now()
	go func() { _, _ = c.Write(data) }()
	h := sha256.New()
	if _, err := io.CopyN(h, c, size); err != nil {
		return 0, fmt.Errorf("echo stalled or broke: %w", err)
	}
	el := time.Since(t0)
	want := sha256.Sum256(data)
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return 0, fmt.Errorf("echo differs (sha256)")
	}
	return float64(size) / (1 << 20) / el.Seconds(), nil
}

func (e *env) latency(mode string, trips int) (p50, p99 time.Duration, err error) {
	u := e.url()
	cmd, err := e.startAgent(mode, u, "cat")
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	c, err := e.client(u)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	return roundTrips(c, trips)
}

// tripCPU is the agent's own CPU time per round trip, in µs: trips
// one-byte echoes through dd bs=1 count=TRIPS (it copies stdin to stdout
// a byte per write, then exits), so that the agent ends and reports its
// rusage.
func (e *env) tripCPU(mode string, trips int) (float64, error) {
	u := e.url()
	cmd, err := e.startAgent(mode, u, fmt.Sprintf("dd bs=1 count=%d status=none", trips)) // write(2) per byte, as cat; head -c would buffer its stdout
	if err != nil {
		return 0, err
	}
	c, err := e.client(u)
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return 0, err
	}
	var rt io.ReadWriter = c
	if mode == "agent-v2" {
		rt = &frameEcho{c: c, fr: wire.NewFrameReader(c)}
	}
	_, _, terr := roundTrips(rt, trips)
	if terr != nil {
		_ = cmd.Process.Kill()
	}
	go func() { _, _ = io.Copy(io.Discard, c) }() // the end: eofs, exit, reason, close_notify
	werr := cmd.Wait()
	_ = c.Close()
	if terr != nil {
		return 0, terr
	}
	_, cpu, err := ownUsage(cmd)
	if err != nil {
		return 0, fmt.Errorf("%v (agent: %v)", err, werr)
	}
	return float64(cpu.Microseconds()) / float64(trips), nil
}

// frameEcho is a v2 client as an io.ReadWriter for roundTrips: writes
// are stdin frames, reads the stdout frames' bytes.
type frameEcho struct {
	c       *tlsdial.Conn
	fr      *wire.FrameReader
	pending []byte
}

func (f *frameEcho) Write(p []byte) (int, error) {
	if _, err := f.c.Write(wire.AppendFrame(nil, wire.FrameStdin, p)); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (f *frameEcho) Read(p []byte) (int, error) {
	for len(f.pending) == 0 {
		t, b, err := f.fr.Next()
		if err != nil {
			return 0, err
		}
		switch t {
		case wire.FrameStdout:
			f.pending = append(f.pending, b...)
		case wire.FramePing:
			_, _ = f.c.Write(wire.AppendFrame(nil, wire.FramePong, b))
		}
	}
	n := copy(p, f.pending)
	f.pending = f.pending[n:]
	return n, nil
}

// roundTrips times trips one-byte round trips on c (an echo at the other
// end) and returns the median and the 99th percentile.
func roundTrips(c io.ReadWriter, trips int) (p50, p99 time.Duration, err error) {
	d := make([]time.Duration, 0, trips)
	b := []byte{'x'}
	for range trips {
		t0 := time.Now()
		if _, err := c.Write(b); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(c, b); err != nil {
			return 0, 0, err
		}
		d = append(d, time.Since(t0))
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2], d[len(d)*99/100], nil
}

// setup times one session from the agent's start to the first output
// byte at a client already waiting at the relay.
func (e *env) setup(mode string) (time.Duration, error) {
	u := e.url()
	paired := e.waitingClient(u)
	t0 := time.Now()
	cmd, err := e.startAgent(mode, u, "echo x")
	if err != nil {
		return 0, err
	}
	c, err := paired()
	if err != nil {
		return 0, err
	}
	b := make([]byte, 1)
	_, err = io.ReadFull(c, b)
	el := time.Since(t0)
	_ = c.Close()
	_ = cmd.Wait()
	return el, err
}

// ptyOneWay is the pty's own one-way limit: read the master as fast as
// possible while head writes the slave. A polling reader, after each read,
// polls the queue (TIOCINQ) for up to 50 µs before the next read, as
// attach-agent does; the plain one just reads (and sleeps in read(2) until
// the tty's worker has refilled the queue).
func ptyOneWay(size int64, polling bool) (float64, error) {
	cmd := exec.Command("head", "-c", strconv.FormatInt(size, 10), "/dev/zero")
	f, err := startRawPTY(cmd)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	t0 := time.Now()
	var r io.Reader = onlyReader{f}
	if polling {
		r = &pollingReader{f: f, fd: int(f.Fd())}
	}
	n, _ := io.CopyBuffer(io.Discard, r, make([]byte, 32<<10)) // ends in EIO
	el := time.Since(t0)
	_ = cmd.Wait()
	if n != size {
		return 0, fmt.Errorf("pty limit: read %d of %d", n, size)
	}
	return float64(size) / (1 << 20) / el.Seconds(), nil
}

// pollingReader reads a blocking pty master, but first waits for the
// queue to fill by polling it for up to 50 µs.
type pollingReader struct {
	f  *os.File
	fd int
}

func (p *pollingReader) Read(b []byte) (int, error) {
	for t0 := time.Now(); time.Since(t0) < 50*time.Microsecond; {
		if q, err := unix.IoctlGetInt(p.fd, unix.TIOCINQ); err != nil || q > 0 {
			break
		}
	}
	return p.f.Read(b)
}

// ptyEchoLimit is cat on a raw pty with no network: write and read back.
func ptyEchoLimit(size int64) (float64, error) {
	cmd := exec.Command("cat")
	f, err := startRawPTY(cmd)
	if err != nil {
		return 0, err
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = f.Close() }()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	t0 := time.Now()
	go func() { _, _ = f.Write(data) }()
	if _, err := io.CopyN(io.Discard, onlyReader{f}, size); err != nil {
		return 0, err
	}
	return float64(size) / (1 << 20) / time.Since(t0).Seconds(), nil
}

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func startRawPTY(cmd *exec.Cmd) (*os.File, error) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return nil, err
	}
	if _, err := term.MakeRaw(int(tty.Fd())); err != nil {
		return nil, err
	}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	_ = tty.Close()
	return ptmx, nil
}

// ownUsage is the child's own peak RSS and CPU time, which it prints as
// it exits. The rusage wait(2) returns is no good for either: Linux
// carries the parent's RSS at fork into the child's ru_maxrss across exec
// (and this process holds the echo buffers), and the CPU time there
// includes the child's reaped children, i.e. the command the agent ran
// (head writing 256 MiB costs 0.4-0.5 s of it).
func ownUsage(cmd *exec.Cmd) (rssKiB int64, cpu time.Duration, err error) {
	out := cmd.Stdout.(*bytes.Buffer).String()
	if _, err := fmt.Sscanf(out, "vmhwm_kib %d cpu_ns %d", &rssKiB, &cpu); err != nil {
		return 0, 0, fmt.Errorf("agent did not report its own usage (%q): %w", out, err)
	}
	return rssKiB, cpu, nil
}

// vmHWM is this process's peak RSS in KiB, from /proc/self/status.
func vmHWM() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// child runs one agent session: "agent" is attach-agent's own Session,
// "ref" the minimal reference (TLS dial, secret, ack, pty.Start, two
// io.Copy). Arguments: CA file, relay port, secret, shell command.
func child(mode string, args []string) int {
	if len(args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: bench agent|ref CA PORT SECRET COMMAND")
		return 2
	}
	port, _ := strconv.Atoi(args[1])
	u := tlsdial.URL{Host: "127.0.0.1", Port: port, Secret: args[2]}
	tcfg, err := tlsdial.LoadTLS(args[0], "", "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	argv := []string{"/bin/sh", "-c", args[3]}
	if mode == "agent" || mode == "agent-v2" {
		u.V2 = mode == "agent-v2"
		res := agent.Run(context.Background(), agent.Spec{
			URL: u, Dial: tlsdial.Config{TLS: tcfg},
			Process: ptyio.Spec{Argv: argv, TTY: true, Raw: true},
		}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if res.Reason != ptyio.ReasonExited && res.Reason != ptyio.ReasonClientGone {
			fmt.Fprintln(os.Stderr, "agent:", res)
			return 1
		}
		return 0
	}
	return reference(u, tcfg, argv)
}

// reference is the minimal agent the issue compares against.
func reference(u tlsdial.URL, tcfg *tls.Config, argv []string) int {
	tcfg.ServerName = u.Host
	conn, err := tls.Dial("tcp", u.Addr(), tcfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ref:", err)
		return 1
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, u.Secret+"\r\n"); err != nil {
		return 1
	}
	var line []byte
	b := make([]byte, 1)
	for !strings.HasSuffix(string(line), "\n") {
		if _, err := conn.Read(b); err != nil {
			return 1
		}
		line = append(line, b[0])
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	ptmx, err := pty.Start(cmd)
	if err != nil {
		return 1
	}
	_, _ = term.MakeRaw(int(ptmx.Fd())) // termios on the master applies to the slave
	go func() { _, _ = io.Copy(ptmx, conn) }()
	_, _ = io.Copy(conn, ptmx)
	_ = cmd.Wait()
	return 0
}
