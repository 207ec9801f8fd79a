package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/daemon"
	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/internal/testroot"
	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
)

func TestMain(m *testing.M) {
	container.Main() // this binary is re-executed as the sandbox init
	daemon.Main()    // and as each session's worker (serve tests run in-process)
	leakcheck.Main(m)
}

func runCLI(args ...string) (int, string, string) {
	var out, errb proctest.Buffer
	code := run(context.Background(), args, stdio{strings.NewReader(""), &out, &errb})
	return code, out.String(), errb.String()
}

// countingListener counts connections: bad input must dial nothing.
func countingListener(t *testing.T) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	return ln.Addr().String(), &n
}

func TestBadInput(t *testing.T) {
	addr, dials := countingListener(t)
	url := "rendezvous://" + addr + "/secret"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"attach", "http://" + addr + "/s", "--", "true"}, `scheme "http" is not supported`},
		{[]string{"attach", "rendezvous://" + addr + "/", "--", "true"}, "empty secret"},
		{[]string{"attach", url}, "missing COMMAND"},
		{[]string{"attach", url, "--"}, "missing COMMAND"},
		{[]string{"attach"}, "missing ATTACH_URL"},
		{[]string{"attach", url, "true"}, "put -- between ATTACH_URL and COMMAND"},
		{[]string{"attach", "--no-tty", "--raw", url, "--", "true"}, "--raw needs a pty"},
		{[]string{"attach", "--binary-input", url, "--", "true"}, "--binary-input applies with --no-tty"},
		{[]string{"attach", "--shell", url, "--", "echo", "hi"}, "--shell takes COMMAND as one string"},
		{[]string{"attach", "--env", "NOEQUALS", url, "--", "true"}, `--env "NOEQUALS": want K=V`},
		{[]string{"attach", "--env", "COLUMNS=wide", url, "--", "true"}, "want a number from 1 to 65535"},
		{[]string{"attach", "--cols", "70000", url, "--", "true"}, "--cols 70000"},
		{[]string{"attach", "--cert", "c.pem", url, "--", "true"}, "give both --cert and --key"},
		{[]string{"attach", "--plain", "--ca", "x.pem", url, "--", "true"}, "--plain conflicts with --ca"},
		{[]string{"attach", "--ca", "/nonexistent/ca.pem", url, "--", "true"}, "ca bundle"},
		{[]string{"attach", "--dial-timeout", "-1s", url, "--", "true"}, "dial timeout is negative"},
		{[]string{"attach", "--stall-timeout", "-1s", url, "--", "true"}, "stall timeout is negative"},
		{[]string{"attach", "--bogus", url, "--", "true"}, "flag provided but not defined: -bogus"},
		{[]string{"attach", "--user", "a b", url, "--", "true"}, `--user "a b": a name or number`},
		{[]string{"attach", "--user", "app:", url, "--", "true"}, `--user "app:": want NAME, UID`},
		{[]string{"attach", "--container-pid", "1", "--rootfs", "/srv/r", url, "--", "true"}, "give pid (join a running container) or rootfs"},
		{[]string{"attach", "--rootfs", "relative", url, "--", "true"}, `rootfs "relative": want an absolute path`},
		{[]string{"attach", "--rootfs", "/srv/r", "--network", "bridge", url, "--", "true"}, `network "bridge": want "host" or "none"`},
		{[]string{"attach", "--hostname", "h", url, "--", "true"}, "hostname, network, limits.nofile, limits.nproc, overlay and privileged are for a sandbox: give rootfs too"},
		{[]string{"attach", "--rootfs", "/srv/r", "--limit-pids", "-1", url, "--", "true"}, "must not be negative"},
		{[]string{"connect"}, "missing ATTACH_URL: set ATTACH_URL, or give --url-file"},
		{[]string{"connect", "--url-file", "-"}, "connect forwards stdin to the session"},
		{[]string{"attach", "--url-file", "/no/such/file", "--", "true"}, "--url-file: open /no/such/file"},
		{[]string{"connect", "rendezvous://h:99999/s"}, `bad port "99999"`},
		{[]string{"rendezvous"}, "say how to serve"},
		{[]string{"rendezvous", "--plain", "--self-signed-ca-out", "x"}, "exclude each other"},
		{[]string{"nosuch"}, `unknown command "nosuch"`},
	} {
		code, _, stderr := runCLI(tc.args...)
		if code != exitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want 2 and %q", tc.args, code, stderr, tc.want)
		}
	}
	if n := dials.Load(); n != 0 {
		t.Fatalf("bad input dialed the relay %d times", n)
	}
}

func TestHelpExitsZero(t *testing.T) {
	for _, c := range []string{"attach", "demo", "rendezvous", "connect", "version"} {
		code, _, stderr := runCLI(c, "-h")
		if code != 0 || !strings.Contains(stderr, "Example:") {
			t.Errorf("%s -h: exit %d, %q", c, code, stderr)
		}
	}
}

// testRelay runs a relay and writes its CA for --ca.
func testRelay(t *testing.T) (port int, caFile string, pool *tls.Config) {
	t.Helper()
	e := relaytest.Start(t, nil)
	return e.Port, e.CAFile(t), e.TLS
}

var secretN atomic.Int64

// attachWithClient runs `attach ARGS URL -- CMD` against a relay with our
// client on the other side, and returns attach's exit code and stderr and
// what the client saw.
func attachWithClient(t *testing.T, flags []string, cmd ...string) (int, string, string, rendezvous.Result) {
	t.Helper()
	port, ca, tcfg := testRelay(t)
	u := tlsdial.URL{Host: "127.0.0.1", Port: port, Secret: fmt.Sprintf("cli-%d", secretN.Add(1))}
	args := append([]string{"attach", "--ca", ca}, flags...)
	args = append(args, "rendezvous://127.0.0.1:"+strconv.Itoa(port)+"/"+u.Secret, "--")
	args = append(args, cmd...)
	type out struct {
		code   int
		stderr string
	}
	done := make(chan out, 1)
	go func() {
		code, _, stderr := runCLI(args...)
		done <- out{code, stderr}
	}()
	var seen bytes.Buffer
	// Empty stdin, ended as the Heroku CLI ends it (0x04, the stream left
	// open): a close would be a hang-up.
	cl := &rendezvous.Client{URL: u, Dial: tlsdial.Config{TLS: tcfg, DialTimeout: 10 * time.Second, PairTimeout: 20 * time.Second}, EOFByte: true, Stdout: &seen}
	res, err := cl.Run(context.Background())
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	select {
	case o := <-done:
		return o.code, o.stderr, seen.String(), res
	case <-time.After(30 * time.Second):
		t.Fatal("attach did not exit")
	}
	return 0, "", "", res
}

func TestAttachExitCodes(t *testing.T) {
	dir := t.TempDir()
	notExec := filepath.Join(dir, "plain-file")
	if err := os.WriteFile(notExec, []byte("echo\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		cmd        []string
		code       int
		clientLine string
	}{
		{[]string{"true"}, 0, ""},
		{[]string{"sh", "-c", "exit 7"}, 7, ""},
		{[]string{"sh", "-c", "kill -9 $$"}, 128 + 9, ""},
		{[]string{notExec}, 126, "attach-agent: " + notExec + ": not executable"},
		{[]string{"no-such-command-xyz"}, 127, "attach-agent: no-such-command-xyz: command not found"},
	} {
		code, stderr, seen, res := attachWithClient(t, []string{"--exit-status-marker"}, tc.cmd...)
		if code != tc.code {
			t.Errorf("%q: attach exit %d, want %d (stderr %q)", tc.cmd, code, tc.code, stderr)
		}
		if !res.Found || res.Status != tc.code {
			t.Errorf("%q: client saw status %d (found %v), want %d", tc.cmd, res.Status, res.Found, tc.code)
		}
		if tc.clientLine != "" && !strings.Contains(seen, tc.clientLine) {
			t.Errorf("%q: client saw %q, want %q", tc.cmd, seen, tc.clientLine)
		}
		if tc.clientLine != "" && !strings.Contains(stderr, "spawn_failed") {
			t.Errorf("%q: stderr %q should give the reason", tc.cmd, stderr)
		}
	}
}

func TestAttachAgentFailuresExit125(t *testing.T) {
	ran := filepath.Join(t.TempDir(), "ran")
	t.Run("relay down", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		code, _, stderr := runCLI("attach", "--dial-timeout", "1s", "rendezvous://"+addr+"/s", "--", "touch", ran)
		if code != exitAgentErr || !strings.Contains(stderr, "dial relay "+addr) || !strings.Contains(stderr, "dial_failed") {
			t.Fatalf("exit %d, stderr %q; want 125 naming the relay", code, stderr)
		}
	})
	t.Run("nobody pairs", func(t *testing.T) {
		port, ca, _ := testRelay(t)
		code, _, stderr := runCLI("attach", "--ca", ca, "--pair-timeout", "300ms",
			"rendezvous://127.0.0.1:"+strconv.Itoa(port)+"/lonely", "--", "touch", ran)
		if code != exitAgentErr || !strings.Contains(stderr, "pair_timeout") {
			t.Fatalf("exit %d, stderr %q; want 125 with pair_timeout", code, stderr)
		}
		if strings.Contains(stderr, "lonely") {
			t.Fatalf("stderr shows the secret: %q", stderr)
		}
	})
	t.Run("wrong CA", func(t *testing.T) {
		port, _, _ := testRelay(t)
		_, otherCA, _ := testRelay(t)
		t0 := time.Now()
		code, _, stderr := runCLI("attach", "--ca", otherCA, "rendezvous://127.0.0.1:"+strconv.Itoa(port)+"/s", "--", "touch", ran)
		if code != exitAgentErr || !strings.Contains(stderr, "unknown authority") {
			t.Fatalf("exit %d, stderr %q; want 125 for the certificate", code, stderr)
		}
		if time.Since(t0) > 5*time.Second {
			t.Fatalf("wrong CA took %v, want at once", time.Since(t0))
		}
	})
	if _, err := os.Stat(ran); err == nil {
		t.Fatal("the command ran although the session never paired")
	}
}

// The demo in a sandbox: `demo --rootfs` as the README shows it, with a
// static busybox as the root's only program.
func TestDemoInASandbox(t *testing.T) {
	root := testroot.Root(t)
	var out, errb proctest.Buffer
	code := run(context.Background(), []string{"demo", "--no-tty", "--rootfs", root, "--hostname", "demo-box", "--limit-pids", "64", "--",
		"/bin/sh", "-c", "cat; hostname; cat /proc/1/cmdline; exit 4"},
		stdio{strings.NewReader("in the box\n"), &out, &errb})
	if code != 4 || out.String() != "in the box\ndemo-box\nattach-agent\x00__sandbox-init\x00" {
		t.Fatalf("demo: exit %d, out %q, stderr %q", code, out.String(), errb.String())
	}
}

func TestDemoRunsACommand(t *testing.T) {
	var out, errb proctest.Buffer
	code := run(context.Background(), []string{"demo", "--no-tty", "--", "sh", "-c", "cat; echo bye; exit 5"},
		stdio{strings.NewReader("through the relay\n"), &out, &errb})
	if code != 5 || out.String() != "through the relay\nbye\n" {
		t.Fatalf("demo: exit %d, out %q, stderr %q", code, out.String(), errb.String())
	}
}

// An agent that dies (SIGKILL: no cleanup of its own) takes its sandbox
// with it: the init's lifeline ends and nothing is left running.
func TestSandboxDiesWithTheAgent(t *testing.T) {
	root := testroot.Root(t)
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	u := relay.URL("lifeline")
	cmd := exec.Command(bin, "attach", "--ca", relay.CAFile(t), "--rootfs", root, "--no-tty",
		"--", "/bin/sh", "-c", "echo ready; exec sleep 300")
	cmd.Env = append(os.Environ(), "ATTACH_URL=rendezvous://"+u.Addr()+"/lifeline")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	c, err := tlsdial.Dial(context.Background(), u, relay.Dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Pair(context.Background(), u.Secret, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	// The init and the sleep, by their host pids (the shell may not have
	// exec'd the sleep yet when "ready" arrives: wait for it, bounded).
	var sandbox []int
	for deadline := time.Now().Add(10 * time.Second); len(sandbox) != 2; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("sandbox processes %v: want the init and the sleep", sandbox)
		}
		sandbox = sandbox[:0]
		for _, p := range descendants(cmd.Process.Pid) {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p)); strings.Contains(string(b), "sandbox-init") || strings.HasPrefix(string(b), "sleep") {
				sandbox = append(sandbox, p)
			}
		}
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, p := range sandbox {
		for syscall.Kill(p, 0) == nil {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); strings.Contains(string(b), ") Z ") {
				break // dead, waiting for a reaper that is not us
			}
			if time.Now().After(deadline) {
				t.Fatalf("sandbox process %d outlived the agent", p)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// descendants lists pid's children, theirs, and so on.
func descendants(pid int) []int {
	// Every process's parent, from /proc/*/stat (a thread's children file
	// misses the children of threads that came and went).
	parent := map[int]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		st := string(b)
		f := strings.Fields(st[strings.LastIndexByte(st, ')')+1:])
		if len(f) > 1 {
			if pp, err := strconv.Atoi(f[1]); err == nil {
				parent[p] = pp
			}
		}
	}
	var out []int
	var walk func(int)
	walk = func(p int) {
		for c, pp := range parent {
			if pp == p {
				out = append(out, c)
				walk(c)
			}
		}
	}
	walk(pid)
	return out
}

// asNobody runs bin with args as uid 65534 and returns its exit code and
// output: the way to show what a non-root agent says.
func asNobody(t *testing.T, bin string, args ...string) (int, string) {
	t.Helper()
	for _, d := range []string{filepath.Dir(bin), filepath.Dir(filepath.Dir(bin))} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), string(out)
}

// Without root, what needs root fails at once as the agent's failure
// (125, not the command's 126) and says why; the command never runs.
func TestNeedsRoot(t *testing.T) {
	root := testroot.Root(t) // skips unless root
	bin := buildAgent(t)
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Dir(root), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		flags []string
		say   string
	}{
		{[]string{"--rootfs", root}, "new namespaces need root"},
		{[]string{"--container-pid", "1"}, "pid 1: permission denied: joining a container's namespaces needs root"},
		{[]string{"--user", "daemon"}, "switching users or groups needs root"},
	} {
		args := append(append([]string{"demo", "--no-tty"}, tc.flags...), "--", "/bin/sh", "-c", `echo comm""and-ran`)
		code, out := asNobody(t, bin, args...)
		if code != 125 || !strings.Contains(out, tc.say) || strings.Contains(out, "command-ran") {
			t.Errorf("%q as nobody: exit %d, output %q: want 125 and %q", tc.flags, code, out, tc.say)
		}
	}
}

// A URL both in the environment and as an argument is refused: the
// argument would otherwise be taken for the command and named in errors.
func TestAttachURLGivenTwice(t *testing.T) {
	t.Setenv("ATTACH_URL", "rendezvous://127.0.0.1:1/env-secret")
	code, _, stderr := runCLI("attach", "rendezvous://127.0.0.1:1/arg-secret", "--", "true")
	if code != exitUsage || !strings.Contains(stderr, "given twice") || strings.Contains(stderr, "secret") {
		t.Errorf("exit %d, stderr %q: want a usage error without the secret", code, stderr)
	}
}

// The attach URL is the session's secret: passed the safe ways, it is in
// no process's command line, neither attach's, connect's nor their
// children's, while the session runs.
func TestSecretInNoCommandLine(t *testing.T) {
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	const secret = "s3cret-never-in-argv"
	url := "rendezvous://" + relay.URL(secret).Addr() + "/" + secret
	ca := relay.CAFile(t)
	attach := exec.Command(bin, "attach", "--ca", ca, "--no-tty", "--", "/bin/sh", "-c", "echo ready; sleep 30 & wait")
	attach.Env = append(os.Environ(), "ATTACH_URL="+url)
	urlFile := filepath.Join(t.TempDir(), "url")
	if err := os.WriteFile(urlFile, []byte(url+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	connect := exec.Command(bin, "connect", "--ca", ca, "--url-file", urlFile)
	stdin, err := connect.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := connect.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var attachErr, connectErr proctest.Buffer
	attach.Stderr, connect.Stderr = &attachErr, &connectErr
	for _, c := range []*exec.Cmd{attach, connect} {
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
	}
	_ = stdin // held open: the session runs until the test ends it
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("read %q, %v (attach: %s, connect: %s)", line, err, attachErr.String(), connectErr.String())
	}
	seen := 0
	for _, root := range []int{attach.Process.Pid, connect.Process.Pid} {
		for _, pid := range append([]int{root}, descendants(root)...) {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if err != nil {
				continue // gone since
			}
			seen++
			if strings.Contains(string(b), secret) {
				t.Errorf("pid %d's command line holds the secret: %q", pid, b)
			}
		}
	}
	if seen < 3 { // attach, connect, the shell (and its sleep)
		t.Errorf("looked at %d processes: want attach, connect and the command", seen)
	}
	for _, s := range []string{attachErr.String(), connectErr.String()} {
		if strings.Contains(s, secret) || strings.Contains(s, "warning") {
			t.Errorf("stderr %q: a secret or a warning", s)
		}
	}
	// A positional URL still works, and says what it exposes.
	code, _, stderr := runCLI("connect", "--ca", ca, "--connect-timeout", "1s", "--dial-timeout", "1s", "rendezvous://127.0.0.1:1/x")
	if code == exitUsage || !strings.Contains(stderr, "readable by every local user") {
		t.Errorf("positional URL: exit %d, stderr %q: want it tried, with the warning", code, stderr)
	}
}
