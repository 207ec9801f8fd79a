package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// serveProc is the real binary's serve, its log in a file (its workers
// write there too, and outlive it: a pipe would hold Wait until they end).
type serveProc struct {
	cmd     *exec.Cmd
	log     string
	started time.Time
	exited  chan struct{}
	err     error
}

func startServe(t *testing.T, bin string, env []string, args ...string) *serveProc {
	t.Helper()
	log := filepath.Join(t.TempDir(), "serve.log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := &serveProc{log: log, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, append([]string{"serve", "--metrics-listen", "", "--log-format", "json"}, args...)...)
	p.cmd.Stderr = f
	p.cmd.Env = append(os.Environ(), env...)
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	control := ""
	for i, a := range args {
		if a == "--control" && i+1 < len(args) {
			control = args[i+1]
		}
	}
	t.Cleanup(func() {
		// Workers outlive their daemon by design: a daemon still up ends
		// its sessions (a drain) so that none outlives the test.
		select {
		case <-p.exited:
		default:
			if control != "" {
				newAPI(control).do("POST", "/v1/drain", `{"grace": "0s"}`)
			}
		}
		_ = p.cmd.Process.Kill() // no-op once it has exited
		<-p.exited
	})
	return p
}

func (p *serveProc) logs() string {
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// waitExit waits (bounded) for serve to exit and returns how long it took.
func (p *serveProc) waitExit(t *testing.T, since time.Time) time.Duration {
	t.Helper()
	select {
	case <-p.exited:
		return time.Since(since)
	case <-time.After(30 * time.Second):
		t.Fatalf("serve did not exit:\n%s", p.logs())
		return 0
	}
}

// serveEnv is the real binary's serve (with env added to its environment)
// on a relay of the test's own, its control socket and state directory in
// a temporary directory, and a client of its API.
func serveEnv(t *testing.T, env []string) (bin string, relay *relaytest.Env, control string, p *serveProc, a *api) {
	t.Helper()
	bin = buildAgent(t)
	relay = relaytest.Start(t, nil)
	dir := t.TempDir()
	control = filepath.Join(dir, "control.sock")
	p = startServe(t, bin, env, "--ca", relay.CAFile(t), "--control", control, "--state-dir", filepath.Join(dir, "state"))
	return bin, relay, control, p, newAPI(control)
}

// api is a client of a control socket.
type api struct {
	hc *http.Client
}

func newAPI(control string) *api {
	return &api{&http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", control)
	}}, Timeout: 60 * time.Second}}
}

// do calls the API; code 0 is a connection that failed.
func (a *api) do(method, path, body string) (int, map[string]any) {
	req, err := http.NewRequest(method, "http://agent"+path, strings.NewReader(body))
	if err != nil {
		return 0, nil
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return 0, nil
	}
	defer resp.Body.Close()
	var v map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&v)
	return resp.StatusCode, v
}

// post starts a session, retrying while the daemon is not up yet.
func (a *api) post(t *testing.T, relay *relaytest.Env, secret, command string) string {
	t.Helper()
	u := relay.URL(secret)
	body := fmt.Sprintf(`{"attach_url": "rendezvous://%s/%s", "command": %s, "tty": false}`, u.Addr(), secret, command)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		code, v := a.do("POST", "/v1/sessions", body)
		if code == http.StatusCreated {
			return v["id"].(string)
		}
		if code != 0 || time.Now().After(deadline) {
			t.Fatalf("POST %s: %d %v", secret, code, v)
		}
	}
}

// stream is a client reading a session's output as it comes.
type stream struct {
	mu   sync.Mutex
	got  []byte
	done chan struct{}
	err  error
}

func attachStream(t *testing.T, relay *relaytest.Env, secret string) *stream {
	t.Helper()
	c, err := tlsdial.Dial(context.Background(), relay.URL(secret), relay.Dial)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if err := c.Pair(context.Background(), secret, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	s := &stream{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		b := make([]byte, 4096)
		for {
			n, err := c.Read(b)
			s.mu.Lock()
			s.got = append(s.got, b[:n]...)
			s.mu.Unlock()
			if err != nil {
				if err != io.EOF {
					s.err = err
				}
				return
			}
		}
	}()
	return s
}

func (s *stream) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.got)
}

// until waits (bounded) for the output to contain want.
func (s *stream) until(t *testing.T, want string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(s.String(), want); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("output never had %q: %q", want, s.String())
		}
	}
}

func (s *stream) end(t *testing.T) string {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(time.Minute):
		t.Fatalf("the stream did not end: %q", s.String())
	}
	if s.err != nil {
		t.Fatalf("stream: %v after %q", s.err, s.String())
	}
	return s.String()
}

// counting is a command that prints "line 0" to "line N-1", one every
// 20 ms, then exits 7: its output is known to the byte.
func counting(n int) (command, want string) {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "line %d\n", i)
	}
	return fmt.Sprintf(`"i=0; while [ $i -lt %d ]; do echo line $i; i=$((i+1)); sleep 0.02; done; exit 7"`, n), b.String()
}

// Sessions outlive their daemon: through SIGTERM (a handover: the daemon is
// gone within 2 s, the next one adopts the worker and takes new sessions
// within 2 s of its start) and through SIGKILL, each session streams on
// byte-exact; the adopting daemon shows it live, DELETE ends it, and its
// end is reported by that daemon and logged once in all.
func TestSessionsOutliveTheDaemon(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	ca := relay.CAFile(t)
	dir := t.TempDir()
	control, state := filepath.Join(dir, "control.sock"), filepath.Join(dir, "state")
	args := []string{"--ca", ca, "--control", control, "--state-dir", state}
	a := newAPI(control)

	first := startServe(t, bin, nil, args...)
	command, want := counting(150)
	id := a.post(t, relay, "outlives-sigterm", command)
	s := attachStream(t, relay, "outlives-sigterm")
	s.until(t, "line 10\n")

	// SIGHUP is logged, and nothing else happens.
	if err := first.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(first.logs(), "SIGHUP"); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no SIGHUP line in the log:\n%s", first.logs())
		}
	}

	sent := time.Now()
	if err := first.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if took := first.waitExit(t, sent); took > 2*time.Second {
		t.Errorf("the daemon took %v to hand over, want at most 2s", took)
	}
	if first.err != nil {
		t.Errorf("serve after SIGTERM: %v", first.err)
	}
	s.until(t, "line 30\n") // streaming on with no daemon at all

	second := startServe(t, bin, nil, args...)
	quick := a.post(t, relay, "new-after-handover", `"echo fresh"`)
	if took := time.Since(second.started); took > 2*time.Second {
		t.Errorf("a new session was accepted %v after the new daemon's start, want within 2s", took)
	}
	if got := attachStream(t, relay, "new-after-handover").end(t); got != "fresh\n" {
		t.Errorf("new session's output %q", got)
	}
	_, v := a.do("GET", "/v1/sessions/"+quick+"?wait=20s", "")
	if v["reason"] != "exited" {
		t.Errorf("new session: %v", v)
	}
	code, v := a.do("GET", "/v1/sessions/"+id, "")
	if code != http.StatusOK || v["state"] != "running" || v["adopted"] != true {
		t.Fatalf("adopted session: %d %v\n%s", code, v, second.logs())
	}
	if got := s.end(t); got != want {
		t.Fatalf("output through the handover differs:\n got %q\nwant %q", got, want)
	}
	_, v = a.do("GET", "/v1/sessions/"+id+"?wait=30s", "")
	if v["reason"] != "exited" || v["exit_code"] != float64(7) || v["bytes_out"] != float64(len(want)) {
		t.Fatalf("adopted session's end: %v", v)
	}

	// SIGKILL: no handover at all; the next daemon adopts all the same,
	// and DELETE through it ends the session.
	id2 := a.post(t, relay, "outlives-sigkill", `"while true; do echo tick; sleep 0.02; done"`)
	s2 := attachStream(t, relay, "outlives-sigkill")
	s2.until(t, "tick\ntick\n")
	if err := second.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	second.waitExit(t, time.Now())
	n := len(s2.String())
	third := startServe(t, bin, nil, args...)
	a.post(t, relay, "after-sigkill", `"true"`) // waits for the daemon to serve
	if _, v := a.do("GET", "/v1/sessions/"+id2, ""); v["state"] != "running" || v["adopted"] != true {
		t.Fatalf("after SIGKILL: %v\n%s", v, third.logs())
	}
	for deadline := time.Now().Add(10 * time.Second); len(s2.String()) < n+50; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no output after the SIGKILL: %q", s2.String())
		}
	}
	if code, _ := a.do("DELETE", "/v1/sessions/"+id2, ""); code != http.StatusAccepted {
		t.Fatalf("DELETE: %d", code)
	}
	got := s2.end(t)
	body, notice, _ := strings.Cut(got, "\r\nattach-agent: session ended")
	if body != strings.Repeat("tick\n", len(body)/5) || notice == "" {
		t.Fatalf("output through the SIGKILL is not whole ticks then the notice: %q", got)
	}
	_, v = a.do("GET", "/v1/sessions/"+id2+"?wait=30s", "")
	if v["reason"] != "killed" {
		t.Fatalf("after DELETE: %v", v)
	}

	// Each end was logged once, by the daemon that saw it.
	all := first.logs() + second.logs() + third.logs()
	for _, sid := range []string{id, id2, quick} {
		if n := strings.Count(all, `"msg":"session ended","session_id":"`+sid+`"`); n != 1 {
			t.Errorf("session %s: %d end lines, want 1:\n%s", sid, n, all)
		}
	}
	if !strings.Contains(second.logs(), `"msg":"session ended","session_id":"`+id+`"`) {
		t.Errorf("the adopting daemon did not report the session's end:\n%s", second.logs())
	}
}

// drain ends every session with reason shutdown after its grace, and the
// daemon takes no new ones from then on.
func TestDrainCommand(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin, relay, control, p, a := serveEnv(t, nil)
	id := a.post(t, relay, "drained-1", `["sleep", "1001"]`)
	s := attachStream(t, relay, "drained-1")
	id2 := a.post(t, relay, "drained-2", `"echo waiting; exec sleep 1002"`) // never paired
	out, err := exec.Command(bin, "drain", "--control", control, "--grace", "300ms").CombinedOutput()
	if err != nil {
		t.Fatalf("drain: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "2 sessions ended, 2 of them by the drain") {
		t.Errorf("drain said %q", out)
	}
	if got := s.end(t); !strings.Contains(got, "the agent is shutting down") {
		t.Errorf("the drained client got %q", got)
	}
	for _, sid := range []string{id, id2} {
		if _, v := a.do("GET", "/v1/sessions/"+sid, ""); v["reason"] != "shutdown" {
			t.Errorf("%s after drain: %v", sid, v)
		}
	}
	if code, v := a.do("POST", "/v1/sessions", `{"attach_url": "rendezvous://127.0.0.1:1/x", "command": "true"}`); code != http.StatusServiceUnavailable {
		t.Errorf("POST after drain: %d %v", code, v)
	}
	if len(proctest.Sleepers("1001"))+len(proctest.Sleepers("1002")) != 0 {
		t.Error("a drained session's command still runs")
	}
	if out, err := exec.Command(bin, "drain", "--control", filepath.Join(t.TempDir(), "nobody.sock")).CombinedOutput(); err == nil || !strings.Contains(string(out), "is attach-agent serve running?") {
		t.Errorf("drain with no daemon: %v %q", err, out)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	p.waitExit(t, time.Now())
}

// A record whose pid now names another process (the worker died, the pid
// was reused) is not adopted: the session is reported as agent_error and
// the process it names is never signalled.
func TestReusedPIDNotAdopted(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	dir := t.TempDir()
	control, state := filepath.Join(dir, "control.sock"), filepath.Join(dir, "state")
	stranger := exec.Command("sleep", "1003")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stranger.Process.Kill(); _ = stranger.Wait() })
	rec := filepath.Join(state, "sessions", "s-0123456789abcdef")
	if err := os.MkdirAll(rec, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(state, "sessions"), 0o700); err != nil {
		t.Fatal(err)
	}
	// The stranger's pid with a start time that is not its own.
	worker := fmt.Sprintf(`{"v":1,"id":"s-0123456789abcdef","pid":%d,"start":"1","started_at":"2026-01-01T00:00:00Z","about":{"secret_fp":"000000000000","relay":"127.0.0.1:1"},"place":"host"}`, stranger.Process.Pid)
	if err := os.WriteFile(filepath.Join(rec, "worker.json"), []byte(worker), 0o600); err != nil {
		t.Fatal(err)
	}
	// A directory that is no record of ours, and a record whose end was
	// logged by a daemon that died before it removed it.
	stray := filepath.Join(state, "sessions", "not-a-record", "precious")
	logged := filepath.Join(state, "sessions", "s-00000000000000aa")
	for _, d := range []string{stray, logged} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(logged, "reported"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	p := startServe(t, bin, nil, "--ca", relay.CAFile(t), "--control", control, "--state-dir", state)
	a := newAPI(control)
	a.post(t, relay, "reuse-probe", `"true"`) // the daemon is up
	if _, err := os.Stat(stray); err != nil {
		t.Errorf("the daemon touched a directory that is no record of its: %v", err)
	}
	if _, err := os.Stat(logged); !os.IsNotExist(err) {
		t.Errorf("a record already reported is still there: %v", err)
	}
	_, v := a.do("GET", "/v1/sessions/s-0123456789abcdef", "")
	if v["state"] != "ended" || v["reason"] != "agent_error" || v["adopted"] != true {
		t.Fatalf("the reused pid's session: %v\n%s", v, p.logs())
	}
	if proctest.Gone(stranger.Process.Pid) {
		t.Fatal("the daemon signalled the process that reused the worker's pid")
	}
	if !strings.Contains(p.logs(), "its worker's pid names another process now") {
		t.Errorf("no log line says why it was not adopted:\n%s", p.logs())
	}
	if _, err := os.Stat(rec); !os.IsNotExist(err) {
		t.Errorf("the reported record is still there: %v", err)
	}
}

// A panic injected into one worker of the real binary (the fault label is
// for tests only) ends that session as agent_error, its command ended;
// another session and the daemon go on.
func TestWorkerPanicIsOneSessions(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	_, relay, _, p, a := serveEnv(t, []string{"ATTACH_AGENT_TEST_FAULT_LABEL=fault"})
	survivor := a.post(t, relay, "panic-survivor", `"echo up; exec sleep 1004"`)
	s := attachStream(t, relay, "panic-survivor")
	s.until(t, "up\n")
	u := relay.URL("panic-victim")
	body := fmt.Sprintf(`{"attach_url": "rendezvous://%s/panic-victim", "command": "echo doomed; exec sleep 1005", "tty": false, "labels": {"fault": "output"}}`, u.Addr())
	code, v := a.do("POST", "/v1/sessions", body)
	if code != http.StatusCreated {
		t.Fatalf("POST: %d %v", code, v)
	}
	victim := v["id"].(string)
	got := attachStream(t, relay, "panic-victim").end(t)
	if !strings.Contains(got, "internal error in the agent (session "+victim+")") {
		t.Errorf("the victim's client got %q", got)
	}
	if _, v := a.do("GET", "/v1/sessions/"+victim+"?wait=30s", ""); v["reason"] != "agent_error" {
		t.Fatalf("victim: %v", v)
	}
	for deadline := time.Now().Add(10 * time.Second); len(proctest.Sleepers("1005")) > 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the victim's command still runs")
		}
	}
	proctest.WaitSleepers(t, "1004", 1) // the survivor's command
	if _, v := a.do("GET", "/v1/sessions/"+survivor, ""); v["state"] != "running" {
		t.Fatalf("the survivor: %v", v)
	}
	if code, _ := a.do("GET", "/healthz", ""); code != http.StatusOK {
		t.Fatalf("the daemon after the panic: %d", code)
	}
	if !strings.Contains(p.logs(), "session panic") {
		t.Errorf("no stack in the log:\n%s", p.logs())
	}
	a.do("DELETE", "/v1/sessions/"+survivor, "")
	s.end(t)
}

// A session's command holds no descriptor but its own stdio, whatever the
// daemon was started with (a parent's leaked fds, systemd's sockets).
func TestCommandGetsNoStrayFds(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	dir := t.TempDir()
	control := filepath.Join(dir, "control.sock")
	var extra []*os.File
	for range 3 {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		defer w.Close()
		extra = append(extra, r)
	}
	log, err := os.Create(filepath.Join(dir, "serve.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(bin, "serve", "--metrics-listen", "", "--ca", relay.CAFile(t), "--control", control, "--state-dir", filepath.Join(dir, "state"))
	cmd.ExtraFiles = extra // fds 3, 4, 5 in serve, not close-on-exec
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	a := newAPI(control)
	id := a.post(t, relay, "fds", `"echo up; exec sleep 1006"`)
	attachStream(t, relay, "fds").until(t, "up")
	pids := proctest.WaitSleepers(t, "1006", 1) // "up" comes before the exec
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pids[0]))
	if err != nil {
		t.Fatal(err)
	}
	var fds []string
	for _, e := range ents {
		fds = append(fds, e.Name())
	}
	if strings.Join(fds, " ") != "0 1 2" {
		t.Errorf("the command's fds: %v, want 0 1 2 alone", fds)
	}
	a.do("DELETE", "/v1/sessions/"+id, "")
}
