package container

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The device allowlist, in each form this host offers (the v1 devices
// controller, the v2 device program), lets a process open the devices a
// sandbox binds and nothing else, even as root, even with the node in
// hand.
func TestDeviceAllowlist(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	null, mem := filepath.Join(dir, "null"), filepath.Join(dir, "mem")
	for path, dev := range map[string]int{null: 1<<8 | 3, mem: 1<<8 | 1} {
		if err := syscall.Mknod(path, syscall.S_IFCHR|0o600, dev); err != nil {
			t.Fatal(err)
		}
	}
	mounts, err := cgroupMounts()
	if err != nil {
		t.Fatal(err)
	}
	tried := 0
	for _, m := range mounts {
		v1 := !m.v2 && m.opts["devices"]
		if m.root != "/" || !m.v2 && !v1 {
			continue
		}
		name := "v2"
		if v1 {
			name = "v1"
		}
		t.Run(name, func(t *testing.T) {
			group := filepath.Join(m.dir, cgroupParent, groupName("test"))
			if err := os.MkdirAll(group, 0o755); err != nil {
				t.Skipf("%s not writable: %v", m.dir, err)
			}
			cg := &cgroup{dirs: []string{group}, v2fd: -1}
			t.Cleanup(func() {
				if err := cg.release(); err != nil {
					t.Error(err)
				}
			})
			if v1 {
				err = denyDevicesV1(group)
			} else {
				cg.v2 = group
				if cg.v2fd, err = syscall.Open(group, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0); err == nil {
					err = denyDevicesV2(group)
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			tried++
			cmd := exec.Command("/bin/sh", "-c", `head -c1 "$0" >/dev/null && echo "null opened"; head -c1 "$1" >/dev/null 2>&1 && echo "mem opened" || echo "mem refused"`, null, mem)
			cmd.SysProcAttr = &syscall.SysProcAttr{}
			var out strings.Builder
			cmd.Stdout = &out
			if err := cg.start(cmd); err != nil {
				t.Fatal(err)
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%v: %s", err, out.String())
			}
			if got := out.String(); got != "null opened\nmem refused\n" {
				t.Errorf("got %q: want null opened, mem refused", got)
			}
		})
	}
	if tried == 0 && os.Getenv("CI") != "" {
		t.Fatal("no cgroup hierarchy to hold devices: the allowlist went untested")
	}
}

// The default filter assembles for this machine (every jump in reach).
func TestDefaultFilterAssembles(t *testing.T) {
	prog, err := defaultFilter()
	if err != nil {
		t.Fatal(err)
	}
	if len(prog) < len(deniedSyscalls)+8 {
		t.Errorf("%d instructions for %d denied calls", len(prog), len(deniedSyscalls))
	}
}

// A v1 group lists the agent itself while the thread that moved in to
// start a command is on its way out: ending the group never kills the
// agent, and waits (bounded) for that thread to leave.
func TestReleaseSparesTheAgent(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	mounts, err := cgroupMounts()
	if err != nil {
		t.Fatal(err)
	}
	var dir string
	for _, m := range mounts {
		if !m.v2 && m.root == "/" && m.opts["pids"] {
			dir = filepath.Join(m.dir, cgroupParent, groupName("test"))
		}
	}
	if dir == "" {
		t.Skip("no v1 pids hierarchy: threads move only there")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	in, leave := make(chan error, 1), make(chan struct{})
	go func() {
		_ = onFreshThread(func() error { // a thread of its own, ended after, as start's
			in <- os.WriteFile(filepath.Join(dir, "tasks"), []byte(strconv.Itoa(syscall.Gettid())), 0)
			<-leave
			return nil
		})
	}()
	if err := <-in; err != nil {
		t.Fatal(err)
	}
	cg := &cgroup{dirs: []string{dir}, v2fd: -1}
	if !holdsAgent(dir) {
		t.Fatal("the group does not list the agent: the test would show nothing")
	}
	// The kill, while the agent's thread is in the group: the agent lives
	// on (this test goes on), and the group is not taken for the tenant's.
	cg.kill(time.Now().Add(killBound))
	if populated(dir) {
		t.Error("the group counts the agent's own thread as a member")
	}
	close(leave)
	if err := cg.release(); err != nil { // waits (bounded) for the thread to leave
		t.Errorf("release: %v", err)
	}
	if _, err := os.Stat(dir); err == nil {
		t.Error("the group is still there")
	}
}
