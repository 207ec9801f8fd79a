package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
)

// TestServe runs the daemon as systemd would (a fake NOTIFY_SOCKET), drives
// one session through the control socket, reads /metrics, and stops it.
func TestServe(t *testing.T) {
	dir := t.TempDir()
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", notifyPath)
	t.Setenv("WATCHDOG_USEC", "200000") // WatchdogSec=0.2s: pings every 100ms
	_ = notify.SetReadDeadline(time.Now().Add(30 * time.Second))

	relay := relaytest.Start(t, nil)
	control := filepath.Join(dir, "run", "control.sock")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stderr proctest.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--ca", relay.CAFile(t), "--control", control, "--state-dir", filepath.Join(dir, "state"),
			"--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--shutdown-grace", "5s"},
			stdio{strings.NewReader(""), io.Discard, &stderr})
	}()
	expectNotify(t, notify, "READY=1")
	expectNotify(t, notify, "WATCHDOG=1")

	for path, mode := range map[string]os.FileMode{control: 0o660, filepath.Dir(control): 0o750} {
		fi, err := os.Stat(path)
		if err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, %v; want %v", path, fi.Mode().Perm(), err, mode)
		}
	}
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", control)
	}}, Timeout: 30 * time.Second}
	secret := "serve-secret-value"
	u := relay.URL(secret)
	body := fmt.Sprintf(`{"attach_url": "rendezvous://%s/%s", "command": "echo via serve", "tty": false}`, u.Addr(), secret)
	resp, err := hc.Post("http://agent/v1/sessions", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var v map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&v)
	resp.Body.Close()
	if resp.StatusCode != 201 {
		t.Fatalf("POST: %d %v", resp.StatusCode, v)
	}
	c, err := tlsdial.Dial(ctx, u, relay.Dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Pair(ctx, secret, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if got, err := io.ReadAll(c); err != nil || string(got) != "via serve\n" {
		t.Fatalf("client: %q, %v", got, err)
	}
	resp, err = hc.Get("http://agent/v1/sessions/" + v["id"].(string) + "?wait=20s")
	if err != nil {
		t.Fatal(err)
	}
	_ = json.NewDecoder(resp.Body).Decode(&v)
	resp.Body.Close()
	if v["reason"] != "exited" || v["exit_code"] != float64(0) {
		t.Fatalf("session: %v", v)
	}
	expectNotify(t, notify, "STATUS=0 active sessions")

	m := regexp.MustCompile(`"metrics":"([^"]+)"`).FindStringSubmatch(stderr.String())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", stderr.String())
	}
	mresp, err := http.Get("http://" + m[1] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(mresp.Body)
	mresp.Body.Close()
	for _, want := range []string{`attach_agent_sessions_ended_total{reason="exited"} 1`, "attach_agent_build_info", "go_goroutines", "process_cpu_seconds_total"} {
		if !bytes.Contains(metrics, []byte(want)) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	cancel() // SIGTERM
	expectNotify(t, notify, "STOPPING=1")
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exited %d:\n%s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	logs := stderr.String()
	if strings.Contains(logs, secret) || bytes.Contains(metrics, []byte(secret)) {
		t.Fatal("the secret appears in the logs or the metrics")
	}
	if !strings.Contains(logs, `"msg":"session ended"`) || !strings.Contains(logs, `"session_id":"s-`) {
		t.Fatalf("no session line in the log:\n%s", logs)
	}
}

func expectNotify(t *testing.T, c *net.UnixConn, want string) {
	t.Helper()
	buf := make([]byte, 4096)
	var seen []string
	for {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q from serve (saw %q): %v", want, seen, err)
		}
		msg := string(buf[:n])
		seen = append(seen, msg)
		if strings.Contains(msg, want) {
			return
		}
	}
}

func TestServeBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--log-format", "xml"}, `--log-format: "xml": want journald, text, json or auto`},
		{[]string{"serve", "--max-sessions", "0"}, "--max-sessions: 0: want 1 or more"},
		{[]string{"serve", "--on-sigterm", "stop"}, `--on-sigterm: "stop": want handover or drain`},
		{[]string{"serve", "--state-dir", "rel"}, `--state-dir: "rel": want an absolute path`},
		{[]string{"serve", "--keepalive", "2s", "--peer-timeout", "1s"}, "--peer-timeout: 1s must be longer than --keepalive (2s)"},
		{[]string{"serve", "extra"}, `unexpected argument "extra"`},
	} {
		code, _, stderr := runCLI(tc.args...)
		if code != exitUsage || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: %d %q", tc.args, code, stderr)
		}
	}
	// A state directory below one that others may write is refused.
	open := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI("serve", "--metrics-listen", "", "--control", filepath.Join(t.TempDir(), "c.sock"), "--state-dir", filepath.Join(open, "state")); code == 0 || !strings.Contains(stderr, "may be changed by others") {
		t.Errorf("a state dir under a world-writable directory: %d %q", code, stderr)
	}
	// A path that exists and is not a socket is refused, not removed.
	f := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(f, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, stderr := runCLI("serve", "--control", f, "--metrics-listen", "")
	if code != exitFailure || !strings.Contains(stderr, "is not a socket") {
		t.Fatalf("serve on a regular file: %d %q", code, stderr)
	}
	if b, _ := os.ReadFile(f); string(b) != "keep me" {
		t.Fatal("serve clobbered a regular file")
	}
}

// TestServeSocketActivation hands serve its control socket the way systemd
// does (fd 3, LISTEN_FDS, LISTEN_PID) and checks it answers there.
func TestServeSocketActivation(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	dir := t.TempDir()
	bin := buildAgent(t)
	sock := filepath.Join(dir, "activated.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false) // the socket lives on in f, for serve
	_ = ln.Close()
	// LISTEN_PID must be serve's own pid: the shell sets it to $$ and execs.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --metrics-listen "" --control "$1"`,
		bin, filepath.Join(dir, "unused", "control.sock"))
	cmd.ExtraFiles = []*os.File{f}
	var stderr proctest.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })

	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}, Timeout: 10 * time.Second}
	resp, err := hc.Get("http://agent/healthz")
	if err != nil {
		t.Fatalf("healthz on the activated socket: %v\n%s", err, stderr.String())
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("healthz: %d", resp.StatusCode)
	}
	if _, err := os.Stat(filepath.Join(dir, "unused")); err == nil {
		t.Fatal("serve made its own control socket although systemd passed one")
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("serve did not stop")
	}
}

// buildAgent builds the real binary into a temporary directory.
func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "attach-agent")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}
