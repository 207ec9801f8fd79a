package main

import (
	"bufio"
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
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
)

const journaldBin = "/lib/systemd/systemd-journald"

// startJournald runs a real systemd-journald in a mount namespace of its
// own whose /run is a fresh tmpfs, so it owns /run/systemd/journal/socket
// there without touching the host's journal. It returns journald's pid:
// /proc/PID/root/run is that /run as the test sees it.
func startJournald(t *testing.T) int {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (a mount namespace for a private journald)")
	}
	if _, err := os.Stat(journaldBin); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is missing: .ci/run installs systemd", journaldBin)
		}
		t.Skipf("no %s: apt-get install systemd", journaldBin)
	}
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec "$0"`, journaldBin)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid // unshare and sh exec in place: this is journald
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	sock := fmt.Sprintf("/proc/%d/root/run/systemd/journal/socket", pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatal("journald did not open its socket")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// journalEntries reads the private journal as JSON, the way an operator's
// journalctl would, keeping attach-agent's entries.
func journalEntries(t *testing.T, journald int) ([]map[string]any, string) {
	t.Helper()
	out, err := exec.Command("journalctl", "--directory", fmt.Sprintf("/proc/%d/root/run/log/journal", journald),
		"--no-pager", "-o", "json", "SYSLOG_IDENTIFIER=attach-agent").Output()
	if err != nil {
		t.Fatalf("journalctl: %v", err)
	}
	var entries []map[string]any
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("journalctl line %q: %v", sc.Text(), err)
		}
		entries = append(entries, e)
	}
	return entries, string(out)
}

// The daemon's journald format against a real journald: one entry per
// session start and end, structured fields, the right priority, and no
// secret anywhere in the journal.
func TestServeRealJournald(t *testing.T) {
	journald := startJournald(t)
	bin := buildAgent(t)
	relay := relaytest.Start(t, nil)
	control := filepath.Join(t.TempDir(), "control.sock")
	// serve joins journald's mount namespace, where the journal socket is.
	cmd := exec.Command("nsenter", "--target", fmt.Sprint(journald), "--mount", "--",
		bin, "serve", "--log-format", "journald", "--ca", relay.CAFile(t), "--control", control, "--metrics-listen", "", "--state-dir", filepath.Join(t.TempDir(), "state"))
	var stderr proctest.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // no-op once it has exited
		<-exited
	})
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", control)
	}}, Timeout: 30 * time.Second}
	secret := "journald-real-secret-0123456789"
	u := relay.URL(secret)
	body := fmt.Sprintf(`{"attach_url": "rendezvous://%s/%s", "command": "echo to the journal; exit 3", "tty": false, "labels": {"app": "shop"}}`,
		u.Addr(), secret)
	var id string
	deadline := time.Now().Add(20 * time.Second)
	for id == "" {
		resp, err := hc.Post("http://agent/v1/sessions", "application/json", strings.NewReader(body))
		if err == nil {
			var v map[string]any
			_ = json.NewDecoder(resp.Body).Decode(&v)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusCreated {
				t.Fatalf("POST: %d %v", resp.StatusCode, v)
			}
			id, _ = v["id"].(string)
		} else if time.Now().After(deadline) {
			t.Fatalf("serve never answered: %v\n%s", err, stderr.String())
		} else {
			time.Sleep(20 * time.Millisecond)
		}
	}
	c, err := tlsdial.Dial(context.Background(), u, relay.Dial)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Pair(context.Background(), secret, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if got, _ := io.ReadAll(c); string(got) != "to the journal\n" {
		t.Fatalf("client got %q", got)
	}
	_ = c.Close()
	// The end is this daemon's to log once it has seen it (a SIGTERM
	// before would hand the session to the next daemon).
	if resp, err := hc.Get("http://agent/v1/sessions/" + id + "?wait=20s"); err == nil {
		_ = resp.Body.Close()
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Fatalf("serve: %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not exit")
	}

	// journald writes as it receives; poll (bounded) until the end entry is there.
	var entries []map[string]any
	var raw string
	var end map[string]any
	for deadline = time.Now().Add(10 * time.Second); end == nil && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		entries, raw = journalEntries(t, journald)
		for _, e := range entries {
			if e["MESSAGE"] == "session ended" && e["SESSION_ID"] == id {
				end = e
			}
		}
	}
	if end == nil {
		t.Fatalf("no session end entry in the journal:\n%s", raw)
	}
	want := map[string]string{"REASON": "exited", "EXIT_CODE": "3", "BYTES_OUT": "15", "BYTES_IN": "0",
		"SECRET_FP": u.Fingerprint(), "LABEL_APP": "shop", "PRIORITY": "6"}
	for k, v := range want {
		if end[k] != v {
			t.Errorf("%s = %v, want %q (entry %v)", k, end[k], v, end)
		}
	}
	if _, ok := end["DURATION_MS"]; !ok {
		t.Errorf("no DURATION_MS in %v", end)
	}
	starts := 0
	for _, e := range entries {
		if e["SESSION_ID"] == id && e["MESSAGE"] != "session ended" && strings.Contains(fmt.Sprint(e["MESSAGE"]), "start") {
			starts++
		}
	}
	if starts != 1 {
		t.Errorf("%d start entries for the session, want 1:\n%s", starts, raw)
	}
	if strings.Contains(raw, secret) {
		t.Fatal("the secret is in the journal")
	}
}
