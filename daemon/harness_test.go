package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/daemon"
	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
)

func TestMain(m *testing.M) {
	container.Main() // this binary is re-executed as the sandbox init
	daemon.Main()    // and as each session's worker
	leakcheck.Main(m)
}

// testDaemon is the supervisor and its API on a unix socket, as serve runs
// them, with workers that are this test binary re-executed.
type testDaemon struct {
	env     *relaytest.Env
	cfg     daemon.Config
	mgr     *daemon.Manager
	reg     *prometheus.Registry
	metrics *daemon.Metrics
	srv     *httptest.Server
	client  *http.Client
	logs    *proctest.Buffer // the daemon's (JSON)
	stderr  *os.File         // the workers' (JSON)
}

// testConfig is DefaultConfig for a relay on loopback, with a state
// directory of the test's own.
func testConfig(t *testing.T, env *relaytest.Env) daemon.Config {
	t.Helper()
	cfg := daemon.DefaultConfig()
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	cfg.CA = env.CAFile(t)
	cfg.Dial.DialTimeout, cfg.Dial.PairTimeout = env.Dial.DialTimeout, env.Dial.PairTimeout
	cfg.LogFormat = "json"
	f, err := os.Create(filepath.Join(t.TempDir(), "workers.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	cfg.Stderr = f
	cfg.Access.UIDs = []uint32{uint32(os.Getuid())}
	return cfg
}

func newDaemon(t *testing.T, edit func(*daemon.Config)) *testDaemon {
	t.Helper()
	env := relaytest.Start(t, nil)
	cfg := testConfig(t, env)
	if edit != nil {
		edit(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	d := &testDaemon{env: env, cfg: cfg, reg: prometheus.NewRegistry(), logs: &proctest.Buffer{}, stderr: cfg.Stderr.(*os.File)}
	d.metrics = daemon.NewMetrics(d.reg)
	mgr, err := daemon.NewManager(cfg, slog.New(slog.NewJSONHandler(d.logs, nil)), d.metrics)
	if err != nil {
		t.Fatal(err)
	}
	d.mgr = mgr
	sock := filepath.Join(t.TempDir(), "control.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	d.srv = httptest.NewUnstartedServer(daemon.NewAPI(d.mgr, cfg.Access, cfg.ShutdownGrace))
	_ = d.srv.Listener.Close()
	d.srv.Listener = ln
	d.srv.Config.ConnContext = daemon.ConnContext
	d.srv.Start()
	d.client = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	t.Cleanup(func() {
		d.srv.Close()
		d.mgr.Drain(context.Background(), 0) // every worker ends, reaped
	})
	return d
}

// workerLogs is what the workers wrote.
func (d *testDaemon) workerLogs(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(d.stderr.Name())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (d *testDaemon) do(t *testing.T, method, path, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, "http://agent"+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := d.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s %s: body %q is not JSON: %v", method, path, b, err)
	}
	return resp.StatusCode, out
}

func (d *testDaemon) post(t *testing.T, secret, extra string) string {
	t.Helper()
	u := d.env.URL(secret)
	body := fmt.Sprintf(`{"attach_url": %q, %s}`, "rendezvous://"+u.Addr()+"/"+secret, extra)
	code, v := d.do(t, "POST", "/v1/sessions", body)
	if code != http.StatusCreated {
		t.Fatalf("POST: %d %v", code, v)
	}
	return v["id"].(string)
}

func (d *testDaemon) attach(t *testing.T, secret string) *tlsdial.Conn {
	t.Helper()
	u := d.env.URL(secret)
	c, err := tlsdial.Dial(context.Background(), u, d.env.Dial)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Pair(context.Background(), secret, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(60 * time.Second))
	return c
}
