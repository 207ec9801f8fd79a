package daemon_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/attach-agent/attach-agent/daemon"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/testroot"
	"github.com/attach-agent/attach-agent/ptyio"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

func TestAPIWholePath(t *testing.T) {
	d := newDaemon(t, nil)
	id := d.post(t, "api-secret-1", `"command": "echo hello from the dyno; exit 6", "tty": false, "labels": {"app": "shop", "dyno": "run_1"}`)
	c := d.attach(t, "api-secret-1")
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello from the dyno\n" {
		t.Fatalf("client got %q, %v", got, err)
	}
	_ = c.Close()
	code, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", "")
	if code != 200 || v["state"] != "ended" || v["reason"] != "exited" || v["exit_code"] != float64(6) {
		t.Fatalf("GET wait: %d %v", code, v)
	}
	if v["labels"].(map[string]any)["app"] != "shop" || v["secret_fp"] != wire.Fingerprint("api-secret-1") {
		t.Errorf("view %v lacks labels or fingerprint", v)
	}

	// DELETE ends a running session with killed.
	id2 := d.post(t, "api-secret-2", `"command": ["sleep", "1000"]`)
	c2 := d.attach(t, "api-secret-2")
	if code, _ := d.do(t, "DELETE", "/v1/sessions/"+id2, ""); code != http.StatusAccepted {
		t.Fatalf("DELETE: %d", code)
	}
	_, _ = io.ReadAll(c2)
	code, v = d.do(t, "GET", "/v1/sessions/"+id2+"?wait=20s", "")
	if v["reason"] != "killed" || v["state"] != "ended" {
		t.Fatalf("after DELETE: %d %v", code, v)
	}
	code, list := d.do(t, "GET", "/v1/sessions", "")
	if code != 200 || len(list["sessions"].([]any)) != 2 {
		t.Fatalf("list: %d %v", code, list)
	}
	if code, _ := d.do(t, "GET", "/v1/sessions/s-nope", ""); code != 404 {
		t.Fatalf("unknown id: %d", code)
	}
	if code, _ := d.do(t, "DELETE", "/v1/sessions/s-nope", ""); code != 404 {
		t.Fatalf("unknown id: %d", code)
	}
	for _, secret := range []string{"api-secret-1", "api-secret-2"} {
		if strings.Contains(d.logs.String(), secret) {
			t.Fatalf("secret in logs:\n%s", d.logs.String())
		}
	}
}

func TestAPIBadRequests(t *testing.T) {
	d := newDaemon(t, func(c *daemon.Config) { c.MaxPairTimeout = time.Minute })
	url := `"attach_url": "rendezvous://127.0.0.1:1/s"`
	for _, tc := range []struct {
		body string
		code int
		want string
	}{
		{`{`, 400, "bad JSON"},
		{`{"command": "true"}`, 400, "attach_url: required"},
		{`{"attach_url": "http://h/s", "command": "true"}`, 400, `attach_url: scheme "http"`},
		{`{` + url + `}`, 400, "command: required"},
		{`{` + url + `, "command": 5}`, 400, "command: must be a string or an array"},
		{`{` + url + `, "command": []}`, 400, "command: empty argv"},
		{`{` + url + `, "command": "  "}`, 400, "command: empty command string"},
		{`{` + url + `, "command": "true", "bogus": 1}`, 400, `unknown field "bogus"`},
		{`{` + url + `, "command": "true", "tty": false, "raw": true}`, 400, "raw: needs a pty"},
		{`{` + url + `, "command": "true", "cols": 70000}`, 400, "cols: 70000 is out of range"},
		{`{` + url + `, "command": "true", "pair_timeout": "soon"}`, 400, `pair_timeout: "soon" is not a positive Go duration`},
		{`{` + url + `, "command": "true", "pair_timeout": "2h"}`, 400, "over the operator's limit of 1m0s"},
		{`{` + url + `, "command": "true", "env": {"A=B": "x"}}`, 400, "env: variable"},
		{`{` + url + `, "command": "true", "labels": {"bad key": "x"}}`, 400, "labels: key"},
		{`{` + url + `, "command": "true", "labels": {"k": "` + strings.Repeat("<", 2000) + `"}}`, 400, "keys and values of at most 1024 bytes"},
		{`{` + url + `, "command": "true", "user": "a b"}`, 400, `user: "a b": a name or number`},
		{`{` + url + `, "command": "true", "user": "x:"}`, 400, `user: "x:": want NAME, UID`},
		{`{` + url + `, "command": "true", "container": {"pid": 1, "rootfs": "/srv/x"}}`, 400, "container: give pid"},
		{`{` + url + `, "command": "true", "container": {"rootfs": "rel"}}`, 400, "container: rootfs \"rel\": want an absolute path"},
		{`{` + url + `, "command": "true", "container": {"rootfs": "/srv/x", "network": "bridge"}}`, 400, `container: network "bridge"`},
		{`{` + url + `, "command": "true", "container": {"pid": 9, "hostname": "h"}}`, 400, "container: hostname, network, limits.nofile, limits.nproc, overlay and privileged are for a sandbox"},
		{`{` + url + `, "command": "true", "container": {"pid": "9"}}`, 400, "container: want {\"pid\": N}"},
		{`{` + url + `, "command": "true", "container": {"rootfs": "/srv/x", "limits": {"cpus": 2}}}`, 400, `unknown field "cpus"`},
		{`{` + url + `, "command": "true"}{}`, 400, "more than one object"},
		{`{"attach_url": "` + strings.Repeat("a", daemon.MaxRequestBody) + `"}`, 413, "request body over"},
	} {
		code, v := d.do(t, "POST", "/v1/sessions", tc.body)
		if code != tc.code || !strings.Contains(fmt.Sprint(v["error"]), tc.want) {
			t.Errorf("%.80s: %d %v; want %d and %q", tc.body, code, v["error"], tc.code, tc.want)
		}
	}
	if code, v := d.do(t, "GET", "/v1/sessions/x?wait=forever", ""); code != 400 {
		t.Errorf("bad wait: %d %v", code, v)
	}
	if n := len(d.mgr.List()); n != 0 || d.mgr.Active() != 0 {
		t.Fatalf("bad requests started %d sessions", n)
	}
}

func TestAPIHundredSessionsAndMetrics(t *testing.T) {
	d := newDaemon(t, nil)
	const n = 100
	ids := make([]string, n)
	for i := range n {
		ids[i] = d.post(t, fmt.Sprintf("many-%d", i), `"command": ["echo", "hi"], "tty": false`)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			secret := fmt.Sprintf("many-%d", i)
			c, err := tlsdial.Dial(context.Background(), d.env.URL(secret), d.env.Dial)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			if err := c.Pair(context.Background(), secret, 30*time.Second); err != nil {
				t.Error(err)
				return
			}
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			if got, err := io.ReadAll(c); err != nil || string(got) != "hi\n" {
				t.Errorf("%s: %q, %v", secret, got, err)
			}
		}()
	}
	wg.Wait()
	for _, id := range ids {
		if _, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=30s", ""); v["reason"] != "exited" {
			t.Fatalf("%s: %v", id, v)
		}
	}
	if d.mgr.Active() != 0 {
		t.Fatalf("%d sessions still active", d.mgr.Active())
	}
	if problems, err := testutil.GatherAndLint(d.reg); err != nil || len(problems) > 0 {
		t.Fatalf("metrics lint: %v %v", problems, err)
	}
	expected := fmt.Sprintf(`
# HELP attach_agent_sessions_active Sessions running now (dialing, waiting for a client, or attached).
# TYPE attach_agent_sessions_active gauge
attach_agent_sessions_active 0
# HELP attach_agent_session_exits_total Commands that ran and ended, by exit class (success, failure, signal).
# TYPE attach_agent_session_exits_total counter
attach_agent_session_exits_total{class="failure"} 0
attach_agent_session_exits_total{class="signal"} 0
attach_agent_session_exits_total{class="success"} %d
# HELP attach_agent_bytes_total Payload bytes moved, by direction (in: client to process, out: process to client).
# TYPE attach_agent_bytes_total counter
attach_agent_bytes_total{direction="in"} 0
attach_agent_bytes_total{direction="out"} %d
`, n, 3*n)
	if err := testutil.GatherAndCompare(d.reg, strings.NewReader(expected),
		"attach_agent_sessions_active", "attach_agent_session_exits_total", "attach_agent_bytes_total"); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(d.metrics.Ended.WithLabelValues("exited")); got != n {
		t.Fatalf("sessions_ended_total{reason=exited} = %v, want %d", got, n)
	}
	// /metrics as Prometheus scrapes it: no secret in it.
	srv := httptest.NewServer(promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Contains(string(body), "many-") || !strings.Contains(string(body), "attach_agent_tls_handshake_duration_seconds_count 100") {
		t.Fatalf("/metrics shows a secret or lacks the handshakes:\n%s", body)
	}
}

// Drain: no new sessions; a running one finishes within the grace, one
// that would not is ended with reason shutdown and its client told so.
func TestDrain(t *testing.T) {
	d := newDaemon(t, nil)
	id := d.post(t, "sd-1", `"command": "read x; echo finished $x", "tty": false`)
	c := d.attach(t, "sd-1")
	id2 := d.post(t, "sd-2", `"command": ["sleep", "1000"]`)
	c2 := d.attach(t, "sd-2")

	done := make(chan []daemon.View)
	go func() { done <- d.mgr.Drain(context.Background(), 2*time.Second) }()
	proctest.WaitFor(t, 10*time.Second, "the manager to close", func() bool { return d.mgr.Closing() })
	if code, v := d.do(t, "POST", "/v1/sessions", `{"attach_url": "rendezvous://127.0.0.1:1/x", "command": "true"}`); code != 503 {
		t.Fatalf("POST while draining: %d %v", code, v)
	}
	if code, _ := d.do(t, "GET", "/healthz", ""); code != 503 {
		t.Fatalf("healthz while draining: %d", code)
	}
	if _, err := io.WriteString(c, "ok\n"); err != nil {
		t.Fatal(err)
	}
	if got, _ := io.ReadAll(c); string(got) != "finished ok\n" {
		t.Fatalf("the running session's output: %q", got)
	}
	notice, _ := io.ReadAll(c2)
	views := <-done
	if len(views) != 2 {
		t.Fatalf("drain returned %v", views)
	}
	if v, _ := d.mgr.Get(id); v.Reason != string(ptyio.ReasonExited) {
		t.Fatalf("first session: %+v", v)
	}
	if v, _ := d.mgr.Get(id2); v.Reason != string(ptyio.ReasonShutdown) {
		t.Fatalf("second session: %+v", v)
	}
	if !strings.Contains(string(notice), "attach-agent: session ended: the agent is shutting down") {
		t.Fatalf("client of the cut session got %q", notice)
	}
}

// The API's user and container fields reach the session, in its worker:
// here a command as nobody in a sandbox.
func TestAPIUserAndContainer(t *testing.T) {
	root := testroot.Root(t)
	d := newDaemon(t, nil)
	id := d.post(t, "api-ctr-1", fmt.Sprintf(`"command": "echo $(id -u) on $(hostname)", "tty": false, "user": "65534:65534", "container": {"rootfs": %q, "hostname": "api-dyno"}`, root))
	c := d.attach(t, "api-ctr-1")
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "65534 on api-dyno\n" {
		t.Fatalf("client got %q, %v\n%s", got, err, d.workerLogs(t))
	}
	_ = c.Close()
	code, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", "")
	if v["reason"] != "exited" || v["exit_code"] != float64(0) || v["user"] != "65534:65534" ||
		fmt.Sprint(v["container"].(map[string]any)["rootfs"]) != root {
		t.Fatalf("GET wait: %d %v", code, v)
	}
	// The spawn histogram counts it under place="sandbox", and nothing elsewhere.
	fams, err := d.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, f := range fams {
		if f.GetName() == "attach_agent_spawn_duration_seconds" {
			for _, m := range f.GetMetric() {
				counts[m.GetLabel()[0].GetValue()] = m.GetHistogram().GetSampleCount()
			}
		}
	}
	if want := map[string]uint64{"host": 0, "join": 0, "sandbox": 1}; fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("spawn histogram counts %v, want %v", counts, want)
	}
	if problems, err := testutil.GatherAndLint(d.reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// The API knows its caller (SO_PEERCRED): only the allowed uids and gids
// get in, the caller is in the view and the log, and the operator's policy
// bounds what an allowed caller may ask, each refusal naming its flag.
func TestAPICallerAndPolicy(t *testing.T) {
	d := newDaemon(t, func(c *daemon.Config) { c.Access = daemon.Access{UIDs: []uint32{54321}, GIDs: []uint32{54321}} })
	code, v := d.do(t, "GET", "/v1/sessions", "")
	if code != http.StatusForbidden || !strings.Contains(fmt.Sprint(v["error"]), fmt.Sprintf("uid %d", os.Getuid())) || !strings.Contains(fmt.Sprint(v["error"]), "--allow-uid") {
		t.Errorf("a caller not allowed: %d %v", code, v)
	}

	d = newDaemon(t, func(c *daemon.Config) {
		c.Access = daemon.Access{UIDs: []uint32{uint32(os.Getuid())}, AllowRootUser: false, RootfsUnder: []string{"/srv/slugs"}}
	})
	url := func(s string) string { u := d.env.URL(s); return "rendezvous://" + u.Addr() + "/" + s }
	for _, tc := range []struct{ body, flag string }{
		{`"command": "true"`, "--allow-root-user"},
		{`"command": "true", "user": "root"`, "--allow-root-user"},
		{`"command": "true", "user": "0:0"`, "--allow-root-user"},
		{`"command": "true", "user": "nobody", "container": {"pid": 1}`, "--allow-join"},
		{`"command": "true", "user": "nobody", "container": {"rootfs": "/srv/slugs/a", "privileged": true}`, "--allow-privileged"},
		{`"command": "true", "user": "nobody", "container": {"rootfs": "/srv/slugs-evil/a"}`, "--rootfs-under"},
		{`"command": "true", "user": "nobody", "container": {"rootfs": "/srv/slugs/../etc"}`, "--rootfs-under"},
	} {
		code, v := d.do(t, "POST", "/v1/sessions", fmt.Sprintf(`{"attach_url": %q, %s}`, url("policy"), tc.body))
		if code != http.StatusForbidden || !strings.Contains(fmt.Sprint(v["error"]), tc.flag) {
			t.Errorf("%s: %d %v, want 403 naming %s", tc.body, code, v, tc.flag)
		}
	}
	if code, _ := d.do(t, "GET", "/v1/sessions", ""); code != http.StatusOK {
		t.Errorf("an allowed caller: %d", code)
	}
	if os.Geteuid() != 0 {
		return // running as nobody needs root
	}
	body := fmt.Sprintf(`{"attach_url": %q, "command": "sleep 30", "user": "nobody"}`, url("dup"))
	code, v = d.do(t, "POST", "/v1/sessions", body)
	if code != http.StatusCreated {
		t.Fatalf("POST: %d %v", code, v)
	}
	id := v["id"].(string)
	caller, _ := v["caller"].(map[string]any)
	if caller == nil || caller["uid"] != float64(os.Getuid()) || caller["pid"] != float64(os.Getpid()) {
		t.Errorf("view's caller %v: want uid %d pid %d", v["caller"], os.Getuid(), os.Getpid())
	}
	// The same secret again while the first runs: the two would pair.
	if code, v := d.do(t, "POST", "/v1/sessions", body); code != http.StatusConflict || !strings.Contains(fmt.Sprint(v["error"]), "already has this attach_url's secret") {
		t.Errorf("duplicate secret: %d %v, want 409", code, v)
	}
	d.do(t, "DELETE", "/v1/sessions/"+id, "")
	if _, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=30s", ""); v["state"] != "ended" {
		t.Fatalf("not ended: %v", v)
	}
	if !strings.Contains(d.logs.String(), fmt.Sprintf(`"caller_pid":%d`, os.Getpid())) {
		t.Errorf("the log lines do not name the caller: %s", d.logs.String())
	}
}

// A connection with no peer credentials (not the unix socket) is refused.
func TestAPIRefusesWithoutPeerCredentials(t *testing.T) {
	d := newDaemon(t, nil)
	srv := httptest.NewServer(daemon.NewAPI(d.mgr, daemon.DefaultAccess(), time.Second))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/v1/sessions")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(b), "unix socket only") {
		t.Errorf("over TCP: %d %s", resp.StatusCode, b)
	}
}

// A panic in one session's worker ends that session alone (agent_error,
// its command killed, the stack in the worker's log, the client told only
// the session's ID); so does a crash of the worker itself (as an OOM kill
// would end it: no result, the daemon ends its command). Another session
// and the daemon go on.
func TestPanicEndsOneSession(t *testing.T) {
	for _, point := range []string{"started", "output", "worker"} {
		t.Run(point, func(t *testing.T) {
			d := newDaemon(t, func(c *daemon.Config) { c.FaultLabel = "fault" })
			survivor := d.post(t, "survivor-"+point, `"command": "echo up; exec sleep 61", "tty": false`)
			sc := d.attach(t, "survivor-"+point)
			if got := proctest.ReadUntil(t, sc, "up\n"); !strings.Contains(got, "up") {
				t.Fatalf("survivor: %q", got)
			}
			victim := d.post(t, "victim-"+point, `"command": "echo doomed; exec sleep 62", "tty": false, "labels": {"fault": "`+point+`"}`)
			vc := d.attach(t, "victim-"+point)
			got, _ := io.ReadAll(vc)
			_, v := d.do(t, "GET", "/v1/sessions/"+victim+"?wait=30s", "")
			if v["reason"] != "agent_error" || v["exit_code"] == float64(0) {
				t.Fatalf("victim: %v", v)
			}
			if point == "worker" {
				if !strings.Contains(fmt.Sprint(v["error"]), "worker ended without a result") || !strings.Contains(d.logs.String(), "session worker lost") {
					t.Errorf("victim %v, daemon log %s: want the lost worker named", v, d.logs.String())
				}
			} else {
				if !strings.Contains(string(got), "internal error in the agent (session "+victim+")") || strings.Contains(string(got), "injected") {
					t.Errorf("victim's client saw %q: want the session's ID and no detail", got)
				}
				if logs := d.workerLogs(t); !strings.Contains(logs, "session panic") || !strings.Contains(logs, "goroutine") {
					t.Errorf("no stack in the worker's log: %s", logs)
				}
			}
			proctest.WaitFor(t, 10*time.Second, "the victim's command to end", func() bool { return len(proctest.Sleepers("62")) == 0 })
			proctest.WaitSleepers(t, "61", 1) // the survivor's
			if _, v := d.do(t, "GET", "/v1/sessions/"+survivor, ""); v["state"] != "running" {
				t.Errorf("survivor: %v", v)
			}
			if n := strings.Count(d.logs.String(), `"msg":"session ended"`); n != 1 {
				t.Errorf("%d session ended lines, want the victim's one:\n%s", n, d.logs.String())
			}
			d.do(t, "DELETE", "/v1/sessions/"+survivor, "")
			if _, v := d.do(t, "GET", "/v1/sessions/"+survivor+"?wait=30s", ""); v["reason"] != "killed" {
				t.Errorf("survivor after DELETE: %v", v)
			}
		})
	}
}

// --rootfs-under sees through links: a link below the directory to a host
// path, or a path that climbs out through one, is outside it.
func TestAPIRootfsUnderResolvesLinks(t *testing.T) {
	dir := t.TempDir()
	if err := os.Symlink("/etc", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "image"), 0o755); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, func(c *daemon.Config) {
		c.Access = daemon.Access{UIDs: []uint32{uint32(os.Getuid())}, AllowRootUser: true, RootfsUnder: []string{dir}}
	})
	u := d.env.URL("links")
	for _, rootfs := range []string{filepath.Join(dir, "link"), filepath.Join(dir, "link/../etc")} {
		body := fmt.Sprintf(`{"attach_url": %q, "command": "true", "container": {"rootfs": %q}}`, "rendezvous://"+u.Addr()+"/links", rootfs)
		if code, v := d.do(t, "POST", "/v1/sessions", body); code != http.StatusForbidden || !strings.Contains(fmt.Sprint(v["error"]), "--rootfs-under") {
			t.Errorf("rootfs %s: %d %v, want 403 naming --rootfs-under", rootfs, code, v)
		}
	}
}

// A worker's dial resumes the TLS session the worker before it had with
// the same relay (the daemon carries it from one to the next): only the
// first session's handshake is a full one, and the end line says which.
func TestWorkersResumeTheRelaySession(t *testing.T) {
	d := newDaemon(t, nil)
	var resumed []bool
	// The first spares started before any session ran (the second is
	// handed the first's TLS session with its order); the later ones are
	// given it when they start.
	for i := range 5 {
		secret := fmt.Sprintf("resume-secret-%d", i)
		id := d.post(t, secret, `"command": "echo up", "tty": false`)
		c := d.attach(t, secret)
		if got, err := io.ReadAll(c); err != nil || string(got) != "up\n" {
			t.Fatalf("session %d: client got %q, %v", i, got, err)
		}
		_ = c.Close()
		if code, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", ""); code != 200 || v["reason"] != "exited" {
			t.Fatalf("session %d: %d %v", i, code, v)
		}
		var line map[string]any
		proctest.WaitFor(t, 10*time.Second, "the session's end line", func() bool {
			for _, l := range strings.Split(d.logs.String(), "\n") {
				if strings.Contains(l, `"session ended"`) && strings.Contains(l, id) {
					return json.Unmarshal([]byte(l), &line) == nil
				}
			}
			return false
		})
		resumed = append(resumed, line["tls_resumed"] == true)
	}
	if !slices.Equal(resumed, []bool{false, true, true, true, true}) {
		t.Fatalf("TLS sessions resumed: %v, want the first a full handshake and the others resumed", resumed)
	}
}

// A session's command runs at the daemon's priority, though the spare
// that runs it started nicer (nice.go), for every session in a row.
func TestCommandRunsAtTheDaemonsPriority(t *testing.T) {
	st, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
	want := fields[16] // field 19, nice, counted from the state (field 3)
	if os.Geteuid() != 0 {
		t.Skip("spares start nicer only under a root daemon")
	}
	d := newDaemon(t, nil)
	for i := range 3 {
		// Each session on a spare, the path that starts nicer.
		proctest.WaitFor(t, 10*time.Second, "a spare in the pool", func() bool { return d.mgr.Spares() > 0 })
		secret := fmt.Sprintf("nice-secret-%d", i)
		id := d.post(t, secret, `"command": "nice", "tty": false`)
		c := d.attach(t, secret)
		got, err := io.ReadAll(c)
		_ = c.Close()
		if err != nil || strings.TrimSpace(string(got)) != want {
			t.Fatalf("session %d: the command's nice is %q (%v), want the daemon's %s", i, got, err, want)
		}
		if code, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", ""); code != 200 || v["reason"] != "exited" {
			t.Fatalf("session %d: %d %v", i, code, v)
		}
	}
}

// A spare is woken at each POST before its body is read, and stays in
// the pool: requests held open and requests refused take none, and start
// or end none, and the session after them takes one of the same
// processes.
func TestRequestsTakeNoSpare(t *testing.T) {
	d := newDaemon(t, nil)
	proctest.WaitFor(t, 10*time.Second, "the pool full", func() bool { return d.mgr.Spares() == 2 })
	before := proctest.Children(os.Getpid())
	body := `{"command": "true"}` // no attach_url: refused, 400
	dial := d.client.Transport.(*http.Transport).DialContext
	var held []net.Conn
	for range 3 {
		c, err := dial(context.Background(), "unix", "")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		head := fmt.Sprintf("POST /v1/sessions HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:1])
		if _, err := io.WriteString(c, head); err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	for range 20 {
		if code, v := d.do(t, "POST", "/v1/sessions", body); code != 400 {
			t.Fatalf("a request without attach_url: %d %v", code, v)
		}
	}
	if n, now := d.mgr.Spares(), proctest.Children(os.Getpid()); n != 2 || !slices.Equal(before, now) {
		t.Fatalf("with 3 requests held open, after 20 refused: %d spares, workers %v, were %v", n, now, before)
	}
	for i, c := range held {
		if _, err := io.WriteString(c, body[1:]); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("held request %d: %v", i, err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("held request %d: %s; want 400 (no attach_url)", i, resp.Status)
		}
	}
	if n, now := d.mgr.Spares(), proctest.Children(os.Getpid()); n != 2 || !slices.Equal(before, now) {
		t.Fatalf("after the held requests: %d spares, workers %v, were %v", n, now, before)
	}
	secret := "woken-secret"
	id := d.post(t, secret, `"command": "echo woken", "tty": false`)
	code, v := d.do(t, "GET", "/v1/sessions/"+id, "")
	if pid, _ := v["worker_pid"].(float64); code != 200 || !slices.Contains(before, int(pid)) {
		t.Fatalf("the session: %d %v; want it in one of the woken spares (among %v)", code, v, before)
	}
	c := d.attach(t, secret)
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "woken\n" {
		t.Fatalf("the session's output: %q, %v", got, err)
	}
	code, v = d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", "")
	if code != 200 || v["reason"] != "exited" {
		t.Fatalf("the session: %d %v; want it exited", code, v)
	}
}

// Spares ended with the pool are reaped, not left as zombies: a zombie
// holds its pid, and counts against the unit's TasksMax.
func TestEndedSparesAreReaped(t *testing.T) {
	d := newDaemon(t, nil)
	proctest.WaitFor(t, 10*time.Second, "the pool full", func() bool { return d.mgr.Spares() == 2 })
	spares := proctest.Children(os.Getpid())
	if len(spares) != 2 {
		t.Fatalf("children %v; want the 2 spares", spares)
	}
	d.mgr.Drain(context.Background(), 0)
	for _, pid := range spares {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err == nil && strings.Contains(string(b), ") Z ") {
			t.Errorf("spare %d is a zombie after the drain: %s", pid, b)
		}
	}
	if now := proctest.Children(os.Getpid()); len(now) != 0 {
		t.Fatalf("children after the drain: %v; want none", now)
	}
}
