package daemon_test

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/proctest"
)

// entries is the sessions directory's names, and what each holds.
func entries(t *testing.T, dir string) map[string][]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string][]string)
	for _, e := range ents {
		var names []string
		if e.IsDir() {
			inner, err := os.ReadDir(filepath.Join(dir, e.Name()))
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range inner {
				names = append(names, f.Name())
			}
		}
		out[e.Name()] = names
	}
	return out
}

// places is the names in the sessions directory that are spares' places.
func places(m map[string][]string) []string {
	var out []string
	for name := range m {
		if strings.HasPrefix(name, ".spare-") {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// A spare waits with its record's place made (its control socket in
// it); a session's record is that place renamed, whole; the daemon
// removes its spares' places when it ends them; a daemon's scan removes a
// dead spare's old place and leaves a young one, and never its own
// spares'.
func TestSparesRecordPlaces(t *testing.T) {
	d := newDaemon(t, nil)
	dir := filepath.Join(d.cfg.StateDir, "sessions")
	proctest.WaitFor(t, 10*time.Second, "the pool full, each spare's place made", func() bool {
		return d.mgr.Spares() == 2 && len(places(entries(t, dir))) == 2
	})
	waiting := entries(t, dir)
	if len(waiting) != 2 {
		t.Fatalf("sessions directory with 2 spares waiting: %v; want their 2 places alone", waiting)
	}
	for name, files := range waiting {
		if !slices.Equal(files, []string{"control.sock"}) {
			t.Fatalf("place %s holds %v; want its control socket alone", name, files)
		}
	}

	// Leftovers of spares that died with their daemon: an old place whose
	// socket nobody listens on any more goes; a young one stays, as does
	// everything that is not a place's name.
	dead := filepath.Join(dir, ".spare-0123456789a")
	young := filepath.Join(dir, ".spare-bbbbbbbbbbb")
	other := filepath.Join(dir, ".spare-not-a-place")
	for _, p := range []string{dead, young, other} {
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dead, "control.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	_ = ln.Close()
	old := time.Now().Add(-2*d.cfg.SetupTimeout - time.Minute)
	ownPlaces := make([]string, 0, len(waiting))
	for name := range waiting {
		ownPlaces = append(ownPlaces, filepath.Join(dir, name)) // old too: an old live spare of ours keeps its place
	}
	for _, p := range append([]string{dead, other}, ownPlaces...) {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	spares := proctest.Children(os.Getpid())
	d.mgr.Adopt()
	after := entries(t, dir)
	if _, ok := after[filepath.Base(dead)]; ok {
		t.Error("a dead spare's old place was not removed")
	}
	for _, p := range []string{young, other} {
		if _, ok := after[filepath.Base(p)]; !ok {
			t.Errorf("%s was removed: only old places nobody answers on go", filepath.Base(p))
		}
		_ = os.RemoveAll(p)
	}
	for name := range waiting {
		if _, ok := after[name]; !ok {
			t.Errorf("the scan removed the place %s of a spare of ours", name)
		}
	}
	if now := proctest.Children(os.Getpid()); d.mgr.Spares() != 2 || !slices.Equal(now, spares) {
		t.Fatalf("after the scan: %d spares, workers %v; want the same 2, %v", d.mgr.Spares(), now, spares)
	}

	secret := "placed-secret"
	id := d.post(t, secret, `"command": "echo placed", "tty": false`)
	rec := entries(t, dir)[id]
	if !slices.Contains(rec, "worker.json") || !slices.Contains(rec, "control.sock") {
		t.Fatalf("the session's record holds %v once the API answered; want worker.json and control.sock", rec)
	}
	c := d.attach(t, secret)
	if got, err := io.ReadAll(c); err != nil || string(got) != "placed\n" {
		t.Fatalf("the session's output: %q, %v", got, err)
	}
	if code, v := d.do(t, "GET", "/v1/sessions/"+id+"?wait=20s", ""); code != 200 || v["reason"] != "exited" {
		t.Fatalf("the session: %d %v", code, v)
	}
	proctest.WaitFor(t, 10*time.Second, "the pool full again", func() bool {
		return d.mgr.Spares() == 2 && len(places(entries(t, dir))) == 2
	})

	d.mgr.Drain(context.Background(), 0)
	if left := entries(t, dir); len(left) != 0 {
		t.Fatalf("sessions directory after the drain: %v; want it empty (records reported, places removed)", left)
	}
}
