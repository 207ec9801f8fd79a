// Command probe tries, from inside a sandbox or container under test, the
// system calls a hostile tenant would, and prints one line each:
// "NAME: ok" or "NAME: ERRNO". busybox has no applet for them. Tests
// build it static (testroot.Probe) into the root they make.
package main

import (
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	for _, name := range os.Args[1:] {
		var err error
		switch name {
		case "keyctl": // the session keyring: shared with the host's kernel
			_, _, e := unix.Syscall(unix.SYS_KEYCTL, unix.KEYCTL_GET_KEYRING_ID, uintptr(0xfffffffd), 1)
			err = errno(e)
		case "clone3": // flags a filter cannot see
			args := make([]byte, 88)
			_, _, e := unix.Syscall(unix.SYS_CLONE3, uintptr(unsafe.Pointer(&args[0])), uintptr(len(args)), 0)
			err = errno(e)
		case "userns":
			err = unix.Unshare(unix.CLONE_NEWUSER)
		case "mount":
			err = unix.Mount("none", "/tmp", "tmpfs", 0, "")
		case "bpf":
			_, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, 0, 0)
			err = errno(e)
		default:
			// w:PATH: may PATH be written? access(2) only, never a write
			// (a host sysctl must not change under a test).
			if path, ok := strings.CutPrefix(name, "w:"); ok {
				err = unix.Access(path, unix.W_OK)
				break
			}
			err = fmt.Errorf("unknown probe")
		}
		if err == nil {
			fmt.Printf("%s: ok\n", name)
		} else {
			fmt.Printf("%s: %v\n", name, err)
		}
	}
}

func errno(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}
