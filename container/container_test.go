package container

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/internal/leakcheck"
	"github.com/attach-agent/attach-agent/ptyio"
)

func TestMain(m *testing.M) { leakcheck.Main(m) }

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		s    Spec
		want string // "" for valid
	}{
		{Spec{}, ""},
		{Spec{PID: 42}, ""},
		{Spec{Rootfs: "/srv/r", Hostname: "run.1-a", Network: NetworkNone, Limits: Limits{Pids: 10, Memory: 1 << 20, NoFile: 64}}, ""},
		{Spec{PID: 1, Rootfs: "/srv/r"}, "not both"},
		{Spec{PID: -3}, "want a process id above 0"},
		{Spec{Hostname: "h"}, "give rootfs too"},
		{Spec{PID: 7, Network: "none"}, "give rootfs too"},
		{Spec{Limits: Limits{Pids: 1, Memory: 1 << 20}}, ""}, // a host session's own limits
		{Spec{Limits: Limits{NoFile: 1}}, "give rootfs too"},
		{Spec{PID: 7, Limits: Limits{Pids: 1}}, "held by its container's own"},
		{Spec{Rootfs: "/proc/1/root"}, "another process's root"},
		{Spec{Rootfs: "/srv/r", OverlaySize: 1 << 20}, "set overlay too"},
		{Spec{Rootfs: "/srv/r", Overlay: true, OverlaySize: -1}, "must not be negative"},
		{Spec{Rootfs: "srv/r"}, "want an absolute path"},
		{Spec{Rootfs: "/"}, "needs its own root directory"},
		{Spec{Rootfs: "/srv/../"}, "needs its own root directory"},
		{Spec{Rootfs: "/srv/r", Hostname: strings.Repeat("h", 65)}, "longer than 64"},
		{Spec{Rootfs: "/srv/r", Hostname: "a_b"}, "only letters, digits"},
		{Spec{Rootfs: "/srv/r", Network: "bridge"}, `want "host" or "none"`},
		{Spec{Rootfs: "/srv/r", Limits: Limits{Memory: -1}}, "must not be negative"},
		{Spec{Rootfs: "/srv/a,b", Overlay: true}, "with overlay, a path without"},
		{Spec{Rootfs: "/srv/a,b"}, ""},
		{Spec{PID: 3, Overlay: true}, "give rootfs too"},
	} {
		err := tc.s.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: %v, want %q", tc.s, err, tc.want)
		}
	}
}

func TestShellAndRoot(t *testing.T) {
	root := t.TempDir()
	s := Spec{Rootfs: root}
	if got := s.Shell(); got != "sh" {
		t.Errorf("no bash in the root: shell %q, want sh", got)
	}
	if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "usr/bin/bash"), nil, 0o755); err != nil {
		t.Fatal(err)
	}
	if got := s.Shell(); got != "bash" {
		t.Errorf("bash in the root: shell %q", got)
	}
	if got := (Spec{PID: 12}).Root(); got != "/proc/12/root" {
		t.Errorf("join root %q", got)
	}
}

// Apply fails before anything starts, with the way out in the message.
func TestApplyErrors(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		s    Spec
		user string
		want string
	}{
		{Spec{PID: 1 << 30}, "", "no such process: give the pid of a process in the running container"},
		{Spec{Rootfs: file}, "", "not a directory"},
		{Spec{Rootfs: t.TempDir()}, "app", "no such file"}, // no etc/passwd in the root
		// The host's root under another name (here a symlink to it).
		{Spec{Rootfs: hostRootLink(t)}, "", "is the host's root directory"},
		{Spec{Rootfs: "/proc/1/root"}, "", "another process's root"},
	} {
		p := ptyio.Spec{Argv: []string{"true"}}
		release, err := Apply(context.Background(), tc.s, tc.user, &p, 0)
		_ = release()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v %q: %v, want %q", tc.s, tc.user, err, tc.want)
		}
		if p.Launch != nil || p.SysProcAttr != nil {
			t.Errorf("%+v: a failed Apply changed the spec", tc.s)
		}
	}
}

func hostRootLink(t *testing.T) string {
	link := filepath.Join(t.TempDir(), "root")
	if err := os.Symlink("/", link); err != nil {
		t.Fatal(err)
	}
	return link
}

// Sweep ends the groups of an agent that is gone, with what runs in them,
// and leaves a live agent's alone.
func TestSweep(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	mounts, err := cgroupMounts()
	if err != nil || len(mounts) == 0 {
		t.Skip("no cgroup hierarchy mounted")
	}
	m := mounts[0]
	for _, c := range mounts {
		if c.v2 && c.root == "/" {
			m = c
		}
	}
	parent := filepath.Join(m.dir, cgroupParent)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	dead := filepath.Join(parent, "session-2147483647-"+randomHex(6)) // above any pid_max: gone
	live := filepath.Join(parent, groupName("session"))               // ours
	// Our pid with another start time: an owner that died, its pid reused
	// (by us); and our pid alone, a name from before start times.
	reused := filepath.Join(parent, fmt.Sprintf("session-%d.1-%s", os.Getpid(), randomHex(6)))
	old := filepath.Join(parent, fmt.Sprintf("session-%d-%s", os.Getpid(), randomHex(6)))
	for _, d := range []string{dead, live, reused, old} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _ = (&cgroup{dirs: []string{live, dead, reused, old}, v2fd: -1}).release() })
	// A process the dead agent left running in its group.
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // gone already when the test passes
		<-waited
	})
	if err := os.WriteFile(filepath.Join(dead, "cgroup.procs"), []byte(strconv.Itoa(cmd.Process.Pid)), 0); err != nil {
		t.Fatal(err)
	}
	if n := Sweep(); n < 2 {
		t.Errorf("Sweep removed %d groups, want at least the 2 of owners that are gone", n)
	}
	for _, g := range []string{dead, reused} {
		if _, err := os.Stat(g); err == nil {
			t.Errorf("%s, a gone owner's group, is still there", g)
		}
	}
	for _, g := range []string{live, old} {
		if _, err := os.Stat(g); err != nil {
			t.Errorf("%s, a live owner's group, went: %v", g, err)
		}
	}
	// ReleaseOwned ends exactly one owner's groups.
	if n := ReleaseOwned(os.Getpid(), "1"); n != 0 {
		t.Errorf("ReleaseOwned of an owner with no groups left removed %d", n)
	}
	select {
	case <-waited:
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
			t.Errorf("the left-behind process ended with %v, want SIGKILL", cmd.ProcessState)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the left-behind process is still running")
	}
}

func TestPlanFrom(t *testing.T) {
	tmp := t.TempDir()
	for _, d := range []string{"memory/ctr", "unified/ctr", "pids/ctr"} {
		if err := os.MkdirAll(filepath.Join(tmp, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mounts := []cgroupMount{
		{dir: filepath.Join(tmp, "memory"), root: "/", opts: map[string]bool{"rw": true, "memory": true}},
		{dir: filepath.Join(tmp, "pids"), root: "/sub", opts: map[string]bool{"pids": true}},
		{dir: filepath.Join(tmp, "unified"), root: "/", v2: true},
	}
	mine := "5:cpu:/\n4:memory:/\n3:pids:/sub\n0::/\n"
	theirs := "5:cpu:/ctr\n4:memory:/ctr\n3:pids:/sub/ctr\n2:devices:/\n1:freezer:/x\n0::/ctr\n"
	plan, err := planFrom(7, theirs, mine, mounts)
	if err != nil {
		t.Fatal(err)
	}
	defer plan.close()
	// cpu and freezer are not mounted here; devices is ours already.
	want := []string{filepath.Join(tmp, "memory/ctr/tasks"), filepath.Join(tmp, "pids/ctr/tasks")}
	if fmt.Sprint(plan.tasks) != fmt.Sprint(want) || plan.v2fd < 0 {
		t.Errorf("plan %v, v2 fd %d; want %v and an fd", plan.tasks, plan.v2fd, want)
	}
	// Everything the agent shares: nothing to move.
	same, err := planFrom(7, mine, mine, mounts)
	if err != nil || len(same.tasks) != 0 || same.v2fd >= 0 {
		t.Errorf("same groups: %+v, %v", same, err)
	}
	// A group outside the agent's cgroup namespace: a clear error.
	if _, err := planFrom(7, "0::/../../kubepods/pod1\n", mine, mounts); err == nil || !strings.Contains(err.Error(), "outside the agent's cgroup namespace") {
		t.Errorf("outside the namespace: %v", err)
	}
}

// remove waits (bounded) only for a group that is busy; a directory it may
// not remove is left at once: a non-root agent's Sweep once took 5 s per
// group another agent left, 80 s at start.
func TestRemoveGivesUpOnWhatIsNotBusy(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "session-1-abc")
	if err := os.MkdirAll(filepath.Join(dir, "child"), 0o755); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = (&cgroup{dirs: []string{dir}, v2fd: -1}).release(); close(done) }()
	select {
	case <-done:
	case <-time.After(4 * time.Second): // the busy wait's bound is 5 s
		t.Fatal("remove kept retrying a directory that is not a busy cgroup")
	}
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("a non-empty directory went: %v", err)
	}
}

// A pid the group listed, then freed and taken by a process outside it
// before the kill, is spared: only what is still listed once pinned gets
// the SIGKILL. What is listed both times is killed.
func TestKillListedSparesWhatLeftTheList(t *testing.T) {
	start := func() *exec.Cmd {
		t.Helper()
		c := exec.Command("sleep", "30")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		return c
	}
	outsider := start()
	reads := 0
	killListed(func() []int {
		if reads++; reads == 1 {
			return []int{outsider.Process.Pid} // listed, then no longer
		}
		return nil
	})
	if reads != 2 {
		t.Fatalf("the group was read %d times, want twice (before and after pinning)", reads)
	}
	if err := outsider.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("a process no longer listed was killed: %v", err)
	}
	member := start()
	killListed(func() []int { return []int{member.Process.Pid} })
	done := make(chan error, 1)
	go func() { done <- member.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("a listed process ended with %v, want SIGKILL", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a process listed both times was not killed")
	}
}
