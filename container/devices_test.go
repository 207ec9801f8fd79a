package container

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
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
