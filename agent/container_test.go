package agent_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/attach"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/internal/proctest"
	"github.com/attach-agent/attach-agent/internal/testroot"
	"github.com/attach-agent/attach-agent/ptyio"
)

// needRoot skips a test that needs root (namespaces, other users); CI runs
// as root, so there it always runs.
func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

// runSession runs spec through the relay with a client that sends nothing,
// and returns the client's output (CR LF turned into LF) and the result.
func runSession(t testing.TB, h *harness, spec agent.Spec) (string, agent.Result) {
	t.Helper()
	u, res := h.session(t, spec)
	c := h.client(t, u)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Errorf("client read: %v", err)
	}
	_ = c.Close() // the session's linger ends with it
	r := wait(t, res, 60*time.Second)
	return strings.ReplaceAll(string(got), "\r\n", "\n"), r
}

func TestUserAndGroups(t *testing.T) {
	needRoot(t)
	h := newHarness(t, nil)
	for _, tc := range []struct {
		user, want, home string
	}{
		{"nobody", "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)", "/nonexistent"},
		{"1234:1234", "uid=1234 gid=1234 groups=1234", "/"},
		{"nobody:daemon", "uid=65534(nobody) gid=1(daemon) groups=1(daemon)", "/nonexistent"},
	} {
		t.Run(tc.user, func(t *testing.T) {
			out, r := runSession(t, h, agent.Spec{
				User:    tc.user,
				Process: ptyio.Spec{Argv: sh(`id; echo "home=$HOME user=$USER logname=$LOGNAME pwd=$(pwd)"`), TTY: true},
			})
			if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
				t.Fatalf("result %v, output %q", r, out)
			}
			if !strings.Contains(out, tc.want+"\n") {
				t.Errorf("id: want %q in %q", tc.want, out)
			}
			name := strings.Split(tc.user, ":")[0]
			if name == "1234" {
				name = ""
			}
			// The home directory does not exist for nobody: the command starts in /.
			if want := fmt.Sprintf("home=%s user=%s logname=%s pwd=/\n", tc.home, name, name); !strings.Contains(out, want) {
				t.Errorf("want %q in %q", want, out)
			}
		})
	}
}

// A user with supplementary groups, looked up in the container's files,
// not the host's.
func TestUserFromTheSandboxFiles(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		User:      "dyno",
		Container: container.Spec{Rootfs: root},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", `id; echo "home=$HOME shell=$SHELL pwd=$(pwd)"`}, TTY: true},
	})
	if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Fatalf("result %v, output %q", r, out)
	}
	for _, want := range []string{
		"uid=2001(dyno) gid=2001(dyno) groups=2001(dyno),3001(builders),3002(deployers)\n",
		"home=/app shell=/bin/sh pwd=/app\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in %q", want, out)
		}
	}
}

// An unknown user or group fails the session before anything runs.
func TestUnknownUserRunsNothing(t *testing.T) {
	h := newHarness(t, nil)
	marker := filepath.Join(t.TempDir(), "ran")
	for _, user := range []string{"no-such-user-here", "nobody:no-such-group", "4242"} {
		t.Run(user, func(t *testing.T) {
			out, r := runSession(t, h, agent.Spec{
				User:             user,
				ExitStatusMarker: true,
				Process:          ptyio.Spec{Argv: sh("touch " + marker), TTY: true},
			})
			if r.Reason != agent.ReasonSpawnFailed || r.Started || r.ExitCode != agent.ExitAgentError {
				t.Errorf("result %+v: want spawn_failed, not started, exit 125", r)
			}
			if !strings.Contains(out, "attach-agent: user") {
				t.Errorf("client got %q: want the reason", out)
			}
			if body, code, ok := stripMarker([]byte(out)); !ok || code != agent.ExitAgentError {
				t.Errorf("marker: %v %d in %q", ok, code, body)
			}
			if _, err := os.Stat(marker); err == nil {
				t.Fatal("the command ran")
			}
		})
	}
}

// The child's environment is what the session gives, never the agent's.
func TestAgentEnvironmentDoesNotLeak(t *testing.T) {
	t.Setenv("AGENT_SECRET_TOKEN", "hunter2")
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Process: ptyio.Spec{Argv: []string{"env"}, Env: []string{"GIVEN=1"}, TTY: true, Cols: 100, Rows: 30},
	})
	if r.Reason != ptyio.ReasonExited {
		t.Fatalf("result %v", r)
	}
	vars := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(line, "=")
		vars[k] = v
	}
	want := map[string]string{"GIVEN": "1", "PATH": ptyio.DefaultPath, "TERM": ptyio.DefaultTerm, "COLUMNS": "100", "LINES": "30"}
	for k, v := range want {
		if vars[k] != v {
			t.Errorf("%s=%q, want %q", k, vars[k], v)
		}
	}
	delete(vars, "PWD") // the shell-less env does not set it, but a future one might
	if len(vars) != len(want) {
		t.Errorf("environment %v: want exactly %v", vars, want)
	}
}

// startContainer starts a "container": a process in new UTS, PID and mount
// namespaces (with its own /proc) and its own hostname, and returns the
// pid of its PID 1 once that has set the hostname. With userns, all of it
// is in a user namespace of its own that maps root to root and every
// other id to 100000 more (as rootless containers do).
func startContainer(t testing.TB, hostname string, userns bool) int {
	t.Helper()
	return startContainerAs(t, hostname, userns, nil)
}

// startContainerAs is startContainer with its PID 1 started through
// confine (e.g. setpriv with a reduced bounding set) once the hostname is
// set.
func startContainerAs(t testing.TB, hostname string, userns bool, confine []string) int {
	t.Helper()
	inner := []string{"unshare", "--uts", "--pid", "--mount", "--fork", "--mount-proc",
		"sh", "-c", `hostname "$0" && exec "$@" sleep 300`, hostname}
	inner = append(inner, confine...)
	args := inner
	if userns {
		// The inner unshare waits until the test has written the maps.
		args = []string{"unshare", "--user", "sh", "-c",
			`i=0; while [ -z "$(cat /proc/self/uid_map)" ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; exec "$@"`, "sh"}
		args = append(args, inner...)
	}
	cmd := exec.Command(args[0], args[1:]...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	outer := cmd.Process.Pid
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // unshare; its child, PID 1 there, is killed below
		_ = cmd.Wait()
	})
	deadline := time.Now().Add(10 * time.Second)
	if userns {
		own, _ := os.Readlink("/proc/self/ns/user")
		for {
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", outer)); err == nil && ns != own {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("no user namespace")
			}
			time.Sleep(5 * time.Millisecond)
		}
		for _, m := range []string{"gid_map", "uid_map"} {
			if err := os.WriteFile(fmt.Sprintf("/proc/%d/%s", outer, m), []byte("0 0 1\n1 100001 65535\n"), 0); err != nil {
				t.Fatalf("%s: %v", m, err)
			}
		}
	}
	ownUTS, _ := os.Readlink("/proc/self/ns/uts")
	for time.Now().Before(deadline) {
		if f := proctest.Children(outer); len(f) == 1 {
			pid := f[0]
			// The container's PID 1, its sleep, in a UTS namespace of its
			// own: not the userns wait loop's sleep, whose namespaces are
			// gone (the link unreadable) while it exits and is still listed.
			comm, err1 := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			uts, err2 := os.Readlink(fmt.Sprintf("/proc/%d/ns/uts", pid))
			if err1 == nil && err2 == nil && string(comm) == "sleep\n" && uts != ownUTS && pidNSInit(pid) {
				t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL); proctest.WaitGone(t, pid) })
				return pid
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("container did not start")
	return 0
}

// pidNSInit reports whether pid is PID 1 of its own pid namespace (the
// last NSpid field of its status).
func pidNSInit(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			return len(f) > 1 && f[len(f)-1] == "1"
		}
	}
	return false
}

// containerCgroups puts pid in a pids and a memory cgroup of its own
// (where those hierarchies are mounted), as a container runtime would, and
// returns the "controller:path" lines a member's /proc/self/cgroup shows.
func containerCgroups(t testing.TB, pid int) []string {
	t.Helper()
	var want []string
	for _, c := range []string{"pids", "memory"} {
		base := filepath.Join("/sys/fs/cgroup", c)
		if _, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil {
			continue // not a v1 hierarchy here
		}
		name := fmt.Sprintf("attach-agent-test-%d", pid)
		dir := filepath.Join(base, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			// Cleanups run last first: the container goes here, before its
			// group can be removed.
			_ = syscall.Kill(pid, syscall.SIGKILL)
			proctest.WaitGone(t, pid)
			deadline := time.Now().Add(10 * time.Second)
			for err := os.Remove(dir); err != nil; err = os.Remove(dir) {
				if time.Now().After(deadline) {
					t.Errorf("cgroup %s: %v", dir, err)
					return
				}
				time.Sleep(10 * time.Millisecond) // until the kernel has let go of its processes
			}
		})
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			t.Fatal(err)
		}
		want = append(want, c+":/"+name)
	}
	return want
}

func TestJoinRunningContainer(t *testing.T) {
	needRoot(t)
	pid := startContainer(t, "dyno-web-1", false)
	cgroups := containerCgroups(t, pid)
	host, _ := os.Hostname()
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{PID: pid},
		Process: ptyio.Spec{Argv: sh(`echo "host=$(hostname) pid1=$(cat /proc/1/comm) self=$$"; ` +
			`for p in /proc/[0-9]*; do echo "proc ${p#/proc/} $(cat $p/comm)"; done; cat /proc/self/cgroup`), TTY: true},
	})
	if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Fatalf("result %v, output %q", r, out)
	}
	// The command is held by the container's cgroups, as docker exec does.
	for _, cg := range cgroups {
		if !strings.Contains(out, ":"+cg+"\n") {
			t.Errorf("want cgroup %q in %q", cg, out)
		}
	}
	if !strings.Contains(out, "host=dyno-web-1 pid1=sleep ") {
		t.Errorf("want the container's hostname and PID 1 in %q (the host is %q)", out, host)
	}
	// Only the container's processes: its sleep (1), our sh, and the
	// subshells that read comm.
	var procs []string
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "proc "); ok {
			procs = append(procs, rest)
		}
	}
	if len(procs) == 0 || len(procs) > 4 || procs[0] != "1 sleep" {
		t.Errorf("processes seen: %q: want the container's sleep as 1 and our own few", procs)
	}
	for _, p := range procs {
		if n, _ := strconv.Atoi(strings.Fields(p)[0]); n > 100 {
			t.Errorf("process %q: a host pid inside the container", p)
		}
	}
}

// A container in its own user namespace is joined through nsenter.
func TestJoinUserNamespace(t *testing.T) {
	needRoot(t)
	pid := startContainer(t, "rootless-1", true)
	cgroups := containerCgroups(t, pid)
	h := newHarness(t, nil)
	for _, tc := range []struct{ user, want string }{
		{"", "uid=0(root) gid=0(root)"},
		{"nobody", "uid=65534(nobody) gid=65534(nogroup)"},
		// Its terminal is its own as the container numbers it (uid 1 is
		// 100001 on the host).
		{"daemon", "uid=1(daemon) gid=1(daemon)"},
	} {
		out, r := runSession(t, h, agent.Spec{
			Container: container.Spec{PID: pid}, User: tc.user,
			Process: ptyio.Spec{Argv: sh(`echo "host=$(hostname) pid1=$(cat /proc/1/comm) pwd=$(pwd)"; id; ` +
				`echo "tty owner $(stat -c %u $(tty))"; cat /proc/self/uid_map; cat /proc/self/cgroup`), TTY: true},
		})
		wantOwner := map[string]string{"": "0", "nobody": "65534", "daemon": "1"}[tc.user]
		if !strings.Contains(out, "tty owner "+wantOwner+"\n") {
			t.Errorf("user %q: want the terminal owned by uid %s inside: %q", tc.user, wantOwner, out)
		}
		for _, cg := range cgroups {
			if !strings.Contains(out, ":"+cg+"\n") {
				t.Errorf("user %q: want cgroup %q in %q", tc.user, cg, out)
			}
		}
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("result %v, output %q", r, out)
		}
		for _, want := range []string{"host=rootless-1 pid1=sleep pwd=/", tc.want, "1     100001      65535"} {
			if !strings.Contains(out, want) {
				t.Errorf("user %q: want %q in %q", tc.user, want, out)
			}
		}
	}
}

func TestJoinErrors(t *testing.T) {
	needRoot(t)
	h := newHarness(t, nil)
	before := mounts(t)
	// A pid that cannot be there (above pid_max).
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{PID: 1 << 30},
		Process:   ptyio.Spec{Argv: []string{"true"}, TTY: true},
	})
	if r.Reason != agent.ReasonSpawnFailed || !strings.Contains(out, "no such process") {
		t.Errorf("result %v, client saw %q: want spawn_failed naming the missing process", r, out)
	}
	// A program missing inside the container: 127, as a shell says it.
	pid := startContainer(t, "c2", false)
	out, r = runSession(t, h, agent.Spec{
		Container: container.Spec{PID: pid},
		Process:   ptyio.Spec{Argv: []string{"/no/such/program"}, TTY: true},
	})
	if r.Reason != agent.ReasonSpawnFailed || r.ExitCode != 127 || !strings.Contains(out, "command not found") {
		t.Errorf("result %v, client saw %q: want spawn_failed, 127", r, out)
	}
	// A working directory missing inside: said as such, not as the program.
	out, r = runSession(t, h, agent.Spec{
		Container: container.Spec{PID: pid},
		Process:   ptyio.Spec{Argv: []string{"true"}, Dir: "/no/such/dir", TTY: true},
	})
	if r.Reason != agent.ReasonSpawnFailed || r.ExitCode != 125 || !strings.Contains(out, "working directory") {
		t.Errorf("result %v, client saw %q: want spawn_failed, 125, the directory", r, out)
	}
	if after := mounts(t); after != before {
		t.Errorf("mounts changed:\n%s\n---\n%s", before, after)
	}
}

// buildRootfs makes a minimal root filesystem: a statically linked busybox
// with its applets, and passwd and group files of its own.
func buildRootfs(t testing.TB) string {
	t.Helper()
	bb := testroot.Busybox(t)
	root := t.TempDir()
	for _, d := range []string{"bin", "etc", "app", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(filepath.Join(root, "app"), 2001, 2001); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/busybox"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "id", "hostname", "cat", "ls", "tty", "sleep", "echo", "pwd", "env", "stty", "ps", "tr", "cut", "head", "touch", "ip", "grep", "mknod", "mount", "unshare", "test", "wc", "seq"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\ndyno:x:2001:2001:dyno:/app:/bin/sh\n",
		"etc/group":  "root:x:0:\ndyno:x:2001:\nbuilders:x:3001:dyno\ndeployers:x:3002:ops,dyno\nother:x:3003:ops\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// mounts is the host's mount table, to show that a sandbox leaves nothing
// mounted.
func mounts(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestSandbox(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	before := mounts(t)
	h := newHarness(t, nil)
	script := `echo "host=$(hostname) pid1=$(cat /proc/1/cmdline | tr '\0' ' ') tty=$(tty)"
(sleep 0.2 & echo $! > /tmp/orphan); o=$(cat /tmp/orphan); i=0
while [ -e /proc/$o ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
if [ -e /proc/$o ]; then echo "orphan still $(cut -d' ' -f3 /proc/$o/stat)"; else echo "orphan reaped"; fi
for p in /proc/[0-9]*; do echo "proc ${p#/proc/} $(cat $p/stat | cut -d' ' -f3) $(cat $p/comm)"; done
set -m; sleep 30 & echo "pgrp sh=$(cut -d' ' -f5 /proc/$$/stat) bg=$(cut -d' ' -f5 /proc/$!/stat) fg=$(cut -d' ' -f8 /proc/$$/stat) self=$$"
stty size; kill %1 && echo "job control ok"`
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{Rootfs: root, Hostname: "one-off-7"},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", script}, TTY: true},
	})
	t.Logf("sandbox output:\n%s", out)
	if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Fatalf("result %v, output %q", r, out)
	}
	for _, want := range []string{"host=one-off-7 ", "pid1=attach-agent __sandbox-init ", "tty=/dev/console\n", "24 80\n", "job control ok\n",
		"orphan reaped\n", // its zombie is gone: the init reaped it
	} {
		if !strings.Contains(out, want) {
			t.Errorf("want %q in %q", want, out)
		}
	}
	// Job control: the shell leads the terminal's foreground group, and a
	// background job gets a group of its own.
	var shPgrp, bgPgrp, fgPgrp, self int
	if i := strings.Index(out, "pgrp "); i < 0 {
		t.Error("no process groups in the output")
	} else if _, err := fmt.Sscanf(out[i:], "pgrp sh=%d bg=%d fg=%d self=%d", &shPgrp, &bgPgrp, &fgPgrp, &self); err != nil {
		t.Errorf("process groups: %v", err)
	} else if shPgrp != self || fgPgrp != self || bgPgrp == self {
		t.Errorf("shell %d in group %d, background job in %d, terminal's foreground group %d: want the shell's own group in front, the job apart",
			self, shPgrp, bgPgrp, fgPgrp)
	}
	var procs []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "proc "); ok {
			procs = append(procs, rest)
			if f := strings.Fields(rest); len(f) > 1 && f[1] == "Z" {
				t.Errorf("zombie in the sandbox: %q (the orphaned sleep was not reaped)", rest)
			}
		}
	}
	// init, our sh, and the subshells of the loop: no host process.
	if len(procs) < 2 || len(procs) > 6 || !strings.HasPrefix(procs[0], "1 ") {
		t.Errorf("processes seen: %q: want only the sandbox's", procs)
	}
	if after := mounts(t); after != before {
		t.Errorf("the sandbox left mounts on the host:\n%s\n---\n%s", before, after)
	}
}

// sandboxLeftovers lists what a sandbox may leave on the host: child
// processes of ours, mounts and cgroups.
func sandboxLeftovers(t testing.TB) string {
	t.Helper()
	return fmt.Sprintf("children: %v\ncgroups: %q\nmounts:\n%s", proctest.Children(os.Getpid()), ownCgroups("*"), mounts(t))
}

// A fork loop inside stops at the pids limit; the host and the agent go
// on, and the limit's cgroup is removed afterwards.
func TestSandboxPidsLimit(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	before := sandboxLeftovers(t)
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{Rootfs: root, Limits: container.Limits{Pids: 24}},
		Process: ptyio.Spec{Argv: []string{"/bin/sh", "-c",
			`i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); echo $i >/tmp/started; done; echo "started all $i"`}, TTY: true},
	})
	t.Logf("output: %q, result %v", out, r)
	if strings.Contains(out, "started all 200") {
		t.Fatal("200 processes started under a limit of 24")
	}
	if !strings.Contains(out, "can't fork") && !strings.Contains(out, "emporarily unavailable") {
		t.Errorf("want the shell's fork failure in %q", out)
	}
	if r.Reason != ptyio.ReasonExited || r.ExitCode == 0 {
		t.Errorf("result %v: want the shell's own failure status", r)
	}
	// init, the shell and the sleeps fill the 24; the loop got that far.
	b, _ := os.ReadFile(filepath.Join(root, "tmp/started"))
	if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || n < 10 || n > 24 {
		t.Errorf("the loop started %q sleeps: want some, and fewer than the limit of 24", b)
	}
	// The agent still runs sessions, and the host still forks.
	out, r = runSession(t, h, agent.Spec{Process: ptyio.Spec{Argv: sh("echo after"), TTY: true}})
	if r.Reason != ptyio.ReasonExited || !strings.Contains(out, "after") {
		t.Errorf("a session after the fork loop: %v %q", r, out)
	}
	waitLeftovers(t, before)
}

// waitLeftovers waits (bounded) until the host is as before.
func waitLeftovers(t testing.TB, before string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		after := sandboxLeftovers(t)
		if after == before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("left behind:\n%s\n--- before:\n%s", after, before)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Every way a sandbox can fail to start says why, and leaves no process,
// mount or cgroup behind.
func TestSandboxErrors(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	notDir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notDir, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A root whose /proc is a file: the init's own setup fails.
	broken := buildRootfs(t)
	if err := os.WriteFile(filepath.Join(broken, "proc"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A root whose /sys is a symlink out of it: refused, not followed.
	escaping := buildRootfs(t)
	if err := os.Symlink("/sys/fs/cgroup", filepath.Join(escaping, "sys")); err != nil {
		t.Fatal(err)
	}
	before := sandboxLeftovers(t)
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name string
		ctr  container.Spec
		user string
		argv []string
		dir  string
		code int
		say  string
	}{
		{"missing program", container.Spec{Rootfs: root, Limits: container.Limits{Pids: 10}}, "", []string{"/bin/bash"}, "", 127, "/bin/bash: command not found"},
		{"not executable", container.Spec{Rootfs: root}, "", []string{"/etc/passwd"}, "", 126, "not executable"},
		{"rootfs not a directory", container.Spec{Rootfs: notDir}, "", []string{"/bin/sh"}, "", 125, "not a directory"},
		{"user missing inside", container.Spec{Rootfs: root}, "nobody", []string{"/bin/sh"}, "", 125, "no such user"},
		{"working directory missing inside", container.Spec{Rootfs: root}, "", []string{"/bin/sh"}, "/no/such/dir", 125, "working directory"},
		{"setup fails inside", container.Spec{Rootfs: broken, Limits: container.Limits{Pids: 10}}, "", []string{"/bin/sh"}, "", 125, "sandbox: mount point"},
		{"mount point is a symlink", container.Spec{Rootfs: escaping}, "", []string{"/bin/sh"}, "", 125, "is a symlink: refusing to mount on it"},
		{"bad hostname", container.Spec{Rootfs: root, Hostname: "bad host"}, "", []string{"/bin/sh"}, "", 125, "hostname"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, r := runSession(t, h, agent.Spec{
				Container: tc.ctr, User: tc.user,
				Process: ptyio.Spec{Argv: tc.argv, Dir: tc.dir, TTY: true},
			})
			if r.Reason != agent.ReasonSpawnFailed || r.ExitCode != tc.code || !strings.Contains(out, tc.say) {
				t.Errorf("result %v, client saw %q: want spawn_failed, %d, %q", r, out, tc.code, tc.say)
			}
		})
	}
	waitLeftovers(t, before)
}

// network none: only loopback, and it is up.
func TestSandboxNetworkNone(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{Rootfs: root, Network: container.NetworkNone},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", "ip -o link; echo sys: $(ls /sys/class/net); touch /sys/x 2>/dev/null || echo sys read-only"}, TTY: true},
	})
	if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Fatalf("result %v, output %q", r, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "1: lo: <LOOPBACK,UP,LOWER_UP>") || lines[1] != "sys: lo" || lines[2] != "sys read-only" {
		t.Errorf("output %q: want only lo, up, in ip and a read-only /sys", lines)
	}
}

// The command in a sandbox holds its terminal and nothing else of the
// agent's or the init's (a stray copy of the init's report pipe once kept
// every interactive session from starting).
func TestSandboxCommandHoldsOnlyItsTerminal(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	u, res := h.session(t, agent.Spec{
		Container: container.Spec{Rootfs: root},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", "echo ready; exec sleep 30"}, TTY: true},
	})
	c := h.client(t, u)
	proctest.ReadUntil(t, c, "ready")
	sleepPid := 0
	deadline := time.Now().Add(10 * time.Second)
	for sleepPid == 0 && time.Now().Before(deadline) {
		for _, init := range proctest.Children(os.Getpid()) {
			if cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", init)); strings.Contains(string(cmd), "__sandbox-init") {
				for _, p := range proctest.Children(init) {
					if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", p)); string(comm) == "sleep\n" {
						sleepPid = p
					}
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if sleepPid == 0 {
		t.Fatal("no sleep under a sandbox init")
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", sleepPid))
	if err != nil {
		t.Fatal(err)
	}
	// busybox keeps fds of its own at 10 and up; ours would be 3 and 4.
	var fds []string
	for _, e := range ents {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", sleepPid, e.Name()))
		fds = append(fds, e.Name()+"->"+target)
		if n, _ := strconv.Atoi(e.Name()); n <= 2 && target != "/dev/console" || n > 2 && n < 10 {
			t.Errorf("fd %s -> %s", e.Name(), target)
		}
	}
	if t.Failed() {
		t.Logf("the command's fds: %q: want 0, 1, 2 on its terminal and nothing of the agent's", fds)
	}
	// A signal's status comes back through the init as 128+N.
	if err := syscall.Kill(sleepPid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(c)
	_ = c.Close()
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 128+int(syscall.SIGTERM) {
		t.Errorf("result %v: want exited 143", r)
	}
	proctest.WaitGone(t, sleepPid)
}

// A raw pty in a sandbox still ends input when the client half-closes: the
// process that reads the terminal sits under the init, in a group of its
// own.
func TestSandboxRawEndOfInput(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	u, res := h.session(t, agent.Spec{
		Container: container.Spec{Rootfs: root},
		Process:   ptyio.Spec{Argv: []string{"/bin/cat"}, TTY: true, Raw: true},
	})
	c := h.client(t, u)
	data := randomBytes(256 << 10)
	got, err := echo(c, data)
	if err != nil || sum(got) != sum(data) {
		t.Fatalf("echo: %d of %d bytes, %v", len(got), len(data), err)
	}
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Errorf("result %v: want cat to see EOF and exit 0", r)
	}
}

// rlimits reach the command; the pids and memory limits are the
// sandbox's cgroups, which hold the init and go away after the session.
func TestSandboxLimits(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	before := sandboxLeftovers(t)
	u, res := h.session(t, agent.Spec{
		Container: container.Spec{Rootfs: root, Limits: container.Limits{NoFile: 64, NProc: 4000, Pids: 50, Memory: 64 << 20}},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", "echo nofile=$(ulimit -n) nproc=$(ulimit -u); read x"}, TTY: true},
	})
	c := h.client(t, u)
	if got := proctest.ReadUntil(t, c, "\n"); !strings.Contains(got, "nofile=64 nproc=4000") {
		t.Errorf("rlimits inside: %q", got)
	}
	dirs := ownCgroups("sandbox")
	if len(dirs) == 0 {
		t.Fatal("no sandbox cgroup")
	}
	limits := map[string]string{"pids.max": "50", "memory.limit_in_bytes": "67108864", "memory.max": "67108864"}
	seen := 0
	for _, d := range dirs {
		for file, want := range limits {
			if b, err := os.ReadFile(filepath.Join(d, file)); err == nil {
				seen++
				if strings.TrimSpace(string(b)) != want {
					t.Errorf("%s/%s = %q, want %s", d, file, b, want)
				}
			}
		}
		if procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs")); len(strings.Fields(string(procs))) != 2 {
			t.Errorf("%s holds %q: want the init and the shell", d, procs)
		}
	}
	if seen != 2 {
		t.Errorf("found %d of the 2 limits in %v", seen, dirs)
	}
	if _, err := io.WriteString(c, "\r"); err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(c)
	_ = c.Close()
	if r := wait(t, res, 30*time.Second); r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
		t.Errorf("result %v", r)
	}
	waitLeftovers(t, before)
}

// A client that vanishes ends a sandboxed session as it does a host one:
// the hangup reaches the command through the init, and a command that
// ignores HUP and TERM goes with the init at the kill; nothing is left.
func TestSandboxClientVanishes(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	before := sandboxLeftovers(t)
	for _, tc := range []struct {
		name, script string
		code         int
	}{
		{"plain", "echo ready; exec sleep 1000", 128 + int(syscall.SIGHUP)},
		{"ignores HUP and TERM", "trap '' HUP TERM; echo ready; sleep 1000; echo survived", 128 + int(syscall.SIGKILL)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, res := h.session(t, agent.Spec{
				Container: container.Spec{Rootfs: root},
				Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", tc.script}},
				Pump:      ptyio.Config{TermDelay: 100 * time.Millisecond, KillGrace: 300 * time.Millisecond},
			})
			c := h.client(t, u)
			proctest.ReadUntil(t, c, "ready\n")
			_ = c.Raw.(*net.TCPConn).SetLinger(0) // a reset, no close_notify
			_ = c.Raw.Close()
			r := wait(t, res, 30*time.Second)
			if r.Reason != ptyio.ReasonClientGone || r.ExitCode != tc.code {
				t.Fatalf("result %v: want client_gone with status %d", r, tc.code)
			}
		})
	}
	waitLeftovers(t, before)
}

// A root command in a sandbox keeps only a container runtime's
// capabilities (Docker's default set, 0xa80425fb): it cannot change the
// sandbox's hostname, mount or trace; privileged keeps them all.
func TestSandboxCapabilities(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	h := newHarness(t, nil)
	script := `grep CapBnd /proc/self/status; grep CapEff /proc/self/status; hostname renamed 2>/dev/null && echo "hostname changed" || echo "hostname refused"`
	for _, tc := range []struct {
		privileged   bool
		bnd, outcome string
	}{
		// Docker's default set less CAP_MKNOD (the device allowlist
		// refuses new nodes anyway) and, with the host's network, less
		// CAP_NET_RAW (raw sockets there see the host's traffic).
		{false, "00000000a00405fb", "hostname refused"},
		{true, "", "hostname changed"},
	} {
		out, r := runSession(t, h, agent.Spec{
			Container: container.Spec{Rootfs: root, Privileged: tc.privileged},
			Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", script}, TTY: true},
		})
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("privileged=%v: result %v, output %q", tc.privileged, r, out)
		}
		bnd := tc.bnd
		if bnd == "" { // every capability this kernel has
			b, err := os.ReadFile("/proc/self/status")
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(b), "\n") {
				if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
					bnd = strings.TrimSpace(v)
				}
			}
		}
		for _, want := range []string{"CapBnd:\t" + bnd + "\n", "CapEff:\t" + bnd + "\n", tc.outcome + "\n"} {
			if !strings.Contains(out, want) {
				t.Errorf("privileged=%v: want %q in %q", tc.privileged, want, out)
			}
		}
	}
}

// With overlay, the sandbox writes to a layer in memory: the root
// directory is untouched after (not even mount points are made in it) and
// nothing is left on the host.
func TestSandboxOverlay(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	scratchBefore, _ := filepath.Glob(filepath.Join(os.TempDir(), "attach-agent-sandbox-*"))
	before := sandboxLeftovers(t)
	h := newHarness(t, nil)
	for i := range 2 { // the second sandbox sees none of the first one's writes
		out, r := runSession(t, h, agent.Spec{
			Container: container.Spec{Rootfs: root, Overlay: true},
			Process: ptyio.Spec{Argv: []string{"/bin/sh", "-c",
				`cat /app/note 2>/dev/null || echo "no note"; echo written > /app/note; rm /bin/cut && echo "removed cut"; ls /proc/1/cmdline`}, TTY: true},
		})
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("run %d: result %v, output %q", i, r, out)
		}
		if !strings.HasPrefix(out, "no note\nremoved cut\n") {
			t.Errorf("run %d: %q: want a fresh root each time", i, out)
		}
	}
	for _, p := range []string{"app/note", "proc", "dev", "sys"} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			t.Errorf("%s appeared in the root directory", p)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "bin/cut")); err != nil {
		t.Errorf("bin/cut removed from the root directory: %v", err)
	}
	waitLeftovers(t, before)
	if after, _ := filepath.Glob(filepath.Join(os.TempDir(), "attach-agent-sandbox-*")); len(after) != len(scratchBefore) {
		t.Errorf("scratch directories left: %v (before %v)", after, scratchBefore)
	}
}

// With the host's network, the sandbox resolves names as the host does:
// the host's resolv.conf, read-only; with none, there is nothing to use.
func TestSandboxResolvConf(t *testing.T) {
	needRoot(t)
	host, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		t.Skip("the host has no /etc/resolv.conf")
	}
	root := buildRootfs(t)
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Container: container.Spec{Rootfs: root, Overlay: true},
		Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", "cat /etc/resolv.conf; echo x >> /etc/resolv.conf || echo read-only"}},
	})
	if r.Reason != ptyio.ReasonExited || !strings.HasPrefix(out, string(host)) || !strings.HasSuffix(out, "read-only\n") {
		t.Errorf("result %v, output %q: want the host's resolv.conf, read-only", r, out)
	}
	if _, err := os.Stat(filepath.Join(root, "etc/resolv.conf")); err == nil {
		t.Error("resolv.conf created in the root directory under overlay")
	}
}

// A host session leaves nothing behind: a daemon that called setsid (out
// of the process group the pump ends) is killed with the session's
// cgroup, which is then removed.
func TestHostSessionLeavesNothing(t *testing.T) {
	needRoot(t)
	pidFile := filepath.Join(t.TempDir(), "daemon.pid")
	before := sandboxLeftovers(t)
	h := newHarness(t, nil)
	out, r := runSession(t, h, agent.Spec{
		Process: ptyio.Spec{Argv: sh(`setsid sh -c 'echo $$ > ` + pidFile + `; exec sleep 1000' </dev/null >/dev/null 2>&1 &
			i=0; while [ ! -s ` + pidFile + ` ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; echo started`), TTY: true},
	})
	if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 || !strings.Contains(out, "started") {
		t.Fatalf("result %v, output %q", r, out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) }) // should be gone already
	proctest.WaitGone(t, pid)
	waitLeftovers(t, before)
}

// ownCgroups lists the groups of kind ("session", "sandbox" or "*") that
// this test binary's agents made, in the hierarchies this host mounts;
// other packages' tests run beside it with groups of their own.
func ownCgroups(kind string) []string {
	var groups []string
	for _, c := range []string{"pids", "memory", "unified", ""} {
		m, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", c, "attach-agent", fmt.Sprintf("%s-%d.*-*", kind, os.Getpid())))
		groups = append(groups, m...)
	}
	return groups
}

// A root shell in a default sandbox, tried as a hostile tenant would: no
// device nodes, no writes to the host's kernel through /proc, no masked
// files, no mounts, new user namespaces or keyrings; privileged keeps
// today's behaviour.
func TestSandboxHoldsAHostileRoot(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	probe := testroot.Probe(t)
	data, err := os.ReadFile(probe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin/probe"), data, 0o755); err != nil {
		t.Fatal(err)
	}
	// The image brings a node for /dev/mem: nodev and the device
	// allowlist must both keep it shut.
	if err := syscall.Mknod(filepath.Join(root, "tmp/mem"), syscall.S_IFCHR|0o600, 1<<8|1); err != nil {
		t.Fatal(err)
	}
	script := `grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status
mknod /tmp/null c 1 3 2>/dev/null && echo "mknod ok" || echo "mknod refused"
head -c1 /tmp/mem >/dev/null 2>&1 && echo "device opened" || echo "device refused"
for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/interrupts; do echo "$f $(cat $f 2>/dev/null | wc -c) bytes"; done
mount -t tmpfs none /tmp 2>/dev/null && echo "mount ok" || echo "mount refused"
unshare -U true 2>/dev/null && echo "unshare ok" || echo "unshare refused"
probe keyctl userns clone3 bpf w:/proc/sys/kernel/core_pattern w:/proc/sysrq-trigger
`
	// Each masked file this kernel has reads empty inside.
	var masked []string
	for _, f := range []string{"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/interrupts"} {
		if _, err := os.Stat(f); err == nil {
			masked = append(masked, f+" 0 bytes")
		}
	}
	if len(masked) == 0 {
		t.Fatal("this kernel has none of the masked /proc files: the test would show nothing")
	}
	sysrq := "w:/proc/sysrq-trigger: read-only file system"
	if _, err := os.Stat("/proc/sysrq-trigger"); err != nil {
		sysrq = "w:/proc/sysrq-trigger: no such file" // a kernel without magic SysRq
	}
	for _, tc := range []struct {
		privileged bool
		want       []string
	}{
		{false, append(masked, sysrq, "NoNewPrivs:\t1\n", "Seccomp:\t2\n", "mknod refused", "device refused",
			"w:/proc/sys/kernel/core_pattern: read-only file system", "mount refused", "unshare refused",
			"keyctl: operation not permitted", "userns: operation not permitted", "clone3: function not implemented",
			"bpf: operation not permitted")},
		{true, []string{"NoNewPrivs:\t0\n", "Seccomp:\t0\n", "mknod ok", "w:/proc/sys/kernel/core_pattern: ok", "mount ok", "keyctl: ok"}},
	} {
		before := sandboxLeftovers(t)
		out, r := runSession(t, h(t), agent.Spec{
			Container: container.Spec{Rootfs: root, Privileged: tc.privileged},
			Process:   ptyio.Spec{Argv: []string{"/bin/sh", "-c", script}, TTY: true},
		})
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("privileged=%v: result %v, output %q", tc.privileged, r, out)
		}
		for _, want := range tc.want {
			if !strings.Contains(out, want) {
				t.Errorf("privileged=%v: want %q in\n%s", tc.privileged, want, out)
			}
		}
		waitLeftovers(t, before)
		_ = os.Remove(filepath.Join(root, "tmp/null"))
	}
}

func h(t *testing.T) *harness { return newHarness(t, nil) }

// A joined command never has more than its container's process: its
// bounding set, a root command's permitted set, and no_new_privs.
func TestJoinTakesTheContainersConfinement(t *testing.T) {
	needRoot(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("no setpriv (util-linux)")
	}
	// chown, kill, setuid, setgid and net_bind_service only (0x4e1).
	pid := startContainerAs(t, "confined-1", false, []string{setpriv,
		"--bounding-set=-all,+chown,+kill,+setuid,+setgid,+net_bind_service", "--inh-caps=-all", "--no-new-privs", "--"})
	status := func(pid string) map[string]string {
		b, err := os.ReadFile("/proc/" + pid + "/status")
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]string{}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok {
				m[k] = strings.TrimSpace(v)
			}
		}
		return m
	}
	target := status(strconv.Itoa(pid))
	if target["CapBnd"] != "00000000000004e1" || target["NoNewPrivs"] != "1" {
		t.Fatalf("the target is not confined as the test meant: %v", target)
	}
	hh := newHarness(t, nil)
	for _, user := range []string{"", "nobody"} {
		out, r := runSession(t, hh, agent.Spec{
			Container: container.Spec{PID: pid}, User: user,
			Process: ptyio.Spec{Argv: sh(`grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status`), TTY: true},
		})
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("user %q: result %v, output %q", user, r, out)
		}
		got := map[string]uint64{}
		for _, line := range strings.Split(out, "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok {
				if n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err == nil {
					got[k] = n
				}
				if k == "NoNewPrivs" && strings.TrimSpace(v) != "1" {
					t.Errorf("user %q: NoNewPrivs %q: want the target's 1", user, v)
				}
			}
		}
		if len(got) != 6 {
			t.Fatalf("user %q: status lines %q", user, out)
		}
		for _, set := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
			if extra := got[set] &^ 0x4e1; extra != 0 {
				t.Errorf("user %q: %s %x holds %x outside the container's bounding set", user, set, got[set], extra)
			}
		}
		if user == "" && got["CapEff"] != 0x4e1 {
			t.Errorf("root: CapEff %x, want the container's 4e1", got["CapEff"])
		}
		if user == "nobody" && got["CapEff"] != 0 {
			t.Errorf("nobody: CapEff %x, want none", got["CapEff"])
		}
	}
}

// The target is pinned when the session starts: one that exits before the
// client pairs runs nothing, anywhere.
func TestJoinTargetGoneBeforePairing(t *testing.T) {
	needRoot(t)
	pid := startContainer(t, "gone-1", false)
	marker := filepath.Join(t.TempDir(), "ran")
	hh := newHarness(t, nil)
	pidfds := countPidfds(t) // os/exec holds some for its own children
	u, res := hh.session(t, agent.Spec{
		Container: container.Spec{PID: pid},
		Process:   ptyio.Spec{Argv: sh("touch " + marker), TTY: true},
	})
	// Once the session holds its pidfd, the container ends; then the
	// client pairs.
	deadline := time.Now().Add(10 * time.Second)
	for countPidfds(t) <= pidfds {
		if time.Now().After(deadline) {
			t.Fatal("the session took no pidfd")
		}
		time.Sleep(time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	proctest.WaitGone(t, pid)
	c := hh.client(t, u)
	got, _ := io.ReadAll(c)
	_ = c.Close()
	r := wait(t, res, 30*time.Second)
	if r.Reason != agent.ReasonSpawnFailed || r.ExitCode != 125 || !strings.Contains(string(got), fmt.Sprintf("container process %d is gone", pid)) {
		t.Errorf("result %v, client saw %q: want spawn_failed, 125, the process gone", r, got)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Error("the command ran")
	}
}

// countPidfds counts the pidfds this process holds.
func countPidfds(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == "anon_inode:[pidfd]" {
			n++
		}
	}
	return n
}

// An image whose /etc/passwd is a FIFO cannot hold the session's setup:
// it fails with 125 and the reason, at once, and the agent goes on.
func TestSandboxFIFOPasswd(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	if err := os.Remove(filepath.Join(root, "etc/passwd")); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(root, "etc/passwd"), 0o644); err != nil {
		t.Fatal(err)
	}
	hh := newHarness(t, nil)
	start := time.Now()
	out, r := runSession(t, hh, agent.Spec{
		Container: container.Spec{Rootfs: root}, User: "dyno", SetupTimeout: 5 * time.Second,
		Process: ptyio.Spec{Argv: []string{"/bin/sh", "-c", "echo ran"}, TTY: true},
	})
	if r.Reason != agent.ReasonSpawnFailed || r.ExitCode != 125 || !strings.Contains(out, "not a regular file") || strings.Contains(out, "ran") {
		t.Errorf("result %v, client saw %q: want spawn_failed, 125, 'not a regular file'", r, out)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the session took %v, past its setup timeout", d)
	}
	// The next session runs.
	if out, r := runSession(t, hh, agent.Spec{Container: container.Spec{Rootfs: root},
		Process: ptyio.Spec{Argv: []string{"/bin/sh", "-c", "echo next"}, TTY: true}}); r.ExitCode != 0 || !strings.Contains(out, "next") {
		t.Errorf("next session: %v %q", r, out)
	}
}

// A fork loop in a host session stops at its pids limit, and nothing of
// it is left after the session (its cgroup is killed at once, then gone).
func TestHostForkLoopHeldByPidsLimit(t *testing.T) {
	needRoot(t)
	before := ownCgroups("session")
	hh := newHarness(t, nil)
	out, r := runSession(t, hh, agent.Spec{
		Container: container.Spec{Limits: container.Limits{Pids: 16}},
		// The shell gives up at the first fork the limit refuses.
		Process: ptyio.Spec{Argv: sh(`i=0; while [ $i -lt 100 ]; do sleep 3131 </dev/null >/dev/null 2>&1 & i=$((i+1)); echo "forked $i"; done`)},
	})
	if r.Reason != ptyio.ReasonExited {
		t.Fatalf("result %v, output %q", r, out)
	}
	if !strings.Contains(out, "forked 1\n") || strings.Contains(out, "forked 16\n") {
		t.Fatalf("output %q: want the loop stopped by the limit of 16 tasks", out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := proctest.Sleepers("3131")
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("processes of the session left: %v", left)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if after := ownCgroups("session"); len(after) != len(before) {
		t.Errorf("session cgroups before %v, after %v", before, after)
	}
}

// A container whose process runs under a seccomp filter: the joined
// command gets the default filter (the target's own cannot be read back)
// and no_new_privs. The container has a v2 cgroup of its own, so the
// command is born there through clone3, which the filter would refuse on
// the forking thread: the join helper installs it instead.
func TestJoinUnderSeccomp(t *testing.T) {
	needRoot(t)
	probe := testroot.Probe(t)
	pid := startContainerAs(t, "filtered-1", false, []string{probe, "seccomp-exec"})
	// What the command is to copy: the container's own, as set up.
	if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err != nil ||
		!strings.Contains(string(st), "NoNewPrivs:\t1\n") || !strings.Contains(string(st), "Seccomp:\t2\n") {
		t.Fatalf("the container's PID 1 is not under the probe's filter with no_new_privs (%v):\n%s", err, st)
	}
	if v2 := v2Group(t, pid); v2 == "" {
		t.Log("no writable cgroup v2 here: the in-process path is tested instead of the helper")
	}
	hh := newHarness(t, nil)
	for _, user := range []string{"", "nobody"} {
		out, r := runSession(t, hh, agent.Spec{
			Container: container.Spec{PID: pid}, User: user,
			Process: ptyio.Spec{Argv: sh(`grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; id -u; cat /proc/self/cgroup; ` + probe + ` keyctl userns mount`), TTY: true},
		})
		if r.Reason != ptyio.ReasonExited || r.ExitCode != 0 {
			t.Fatalf("user %q: result %v, output %q", user, r, out)
		}
		wantUID := map[string]string{"": "0", "nobody": "65534"}[user]
		for _, want := range []string{"Seccomp:\t2\n", "NoNewPrivs:\t1\n", "\n" + wantUID + "\n",
			"keyctl: operation not permitted", "userns: operation not permitted", "mount: operation not permitted"} {
			if !strings.Contains(out, want) {
				t.Errorf("user %q: want %q in\n%s", user, want, out)
			}
		}
		if g := v2Group(t, 0); g != "" && !strings.Contains(out, "0::"+g+"\n") {
			t.Errorf("user %q: want the container's v2 group %s in\n%s", user, g, out)
		}
	}
}

// v2Group puts pid in a v2 group of its own, the first time (pid != 0),
// and returns its path as /proc/PID/cgroup names it; "" without a
// writable unified hierarchy.
var v2Groups = map[*testing.T]string{}

func v2Group(t *testing.T, pid int) string {
	if pid == 0 {
		return v2Groups[t]
	}
	base := "/sys/fs/cgroup/unified"
	if _, err := os.Stat(filepath.Join(base, "cgroup.procs")); err != nil {
		base = "/sys/fs/cgroup"
		if _, err := os.Stat(filepath.Join(base, "cgroup.subtree_control")); err != nil {
			return ""
		}
	}
	name := fmt.Sprintf("attach-agent-test-v2-%d", pid)
	dir := filepath.Join(base, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		return ""
	}
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		proctest.WaitGone(t, pid)
		deadline := time.Now().Add(10 * time.Second)
		for os.Remove(dir) != nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond) // until the kernel lets go of its processes
		}
	})
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatal(err)
	}
	v2Groups[t] = "/" + name
	return v2Groups[t]
}

// Protocol v2 in pipes mode gives stderr a pipe of its own inside a
// sandbox and in a joined container too: the sandbox's init and the join
// pass the command's three fds through as they are.
func TestV2StderrApartInContainers(t *testing.T) {
	needRoot(t)
	root := buildRootfs(t)
	pid := startContainer(t, "dyno-web-2", false)
	h := newHarness(t, nil)
	for _, tc := range []struct {
		name string
		c    container.Spec
	}{
		{"sandbox", container.Spec{Rootfs: root, Hostname: "one-off-8"}},
		{"join", container.Spec{PID: pid}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, errOut, r, err := h.v2Run(t, agent.Spec{Container: tc.c, Process: ptyio.Spec{
				Argv: []string{"/bin/sh", "-c", `echo "out $(hostname)"; echo "err $(hostname)" >&2; exit 4`},
			}})
			var ee *attach.ExitError
			if !errors.As(err, &ee) || ee.Code != 4 {
				t.Errorf("Wait = %v, want exit status 4", err)
			}
			host := tc.c.Hostname
			if host == "" {
				host = "dyno-web-2"
			}
			if out != "out "+host+"\n" || errOut != "err "+host+"\n" {
				t.Errorf("stdout %q, stderr %q: want each on its own stream, from inside %s", out, errOut, host)
			}
			if r.Reason != ptyio.ReasonExited || r.ExitCode != 4 {
				t.Errorf("agent result %v", r)
			}
		})
	}
}
