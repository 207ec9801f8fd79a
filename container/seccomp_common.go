//go:build amd64 || arm64

package container

import "golang.org/x/sys/unix"

// commonDenied are the calls both architectures number that the default
// filter refuses with EPERM.
var commonDenied = []uintptr{
	// Kernel code and the running kernel.
	unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE,
	unix.SYS_KEXEC_LOAD, unix.SYS_KEXEC_FILE_LOAD, unix.SYS_REBOOT, unix.SYS_BPF,
	unix.SYS_PERF_EVENT_OPEN, unix.SYS_LOOKUP_DCOOKIE, unix.SYS_SYSLOG,
	// Filesystems and mounts, old and new API.
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT, unix.SYS_FSOPEN, unix.SYS_FSCONFIG,
	unix.SYS_FSMOUNT, unix.SYS_FSPICK, unix.SYS_MOVE_MOUNT, unix.SYS_OPEN_TREE, unix.SYS_OPEN_TREE_ATTR,
	unix.SYS_MOUNT_SETATTR, unix.SYS_SWAPON, unix.SYS_SWAPOFF, unix.SYS_QUOTACTL, unix.SYS_QUOTACTL_FD,
	unix.SYS_NAME_TO_HANDLE_AT, unix.SYS_OPEN_BY_HANDLE_AT, unix.SYS_ACCT,
	// Namespaces: entering or making new ones (clone's flags are checked apart).
	unix.SYS_UNSHARE, unix.SYS_SETNS,
	// Keyrings, shared with the host's kernel.
	unix.SYS_ADD_KEY, unix.SYS_REQUEST_KEY, unix.SYS_KEYCTL,
	// Host clocks.
	unix.SYS_CLOCK_SETTIME, unix.SYS_SETTIMEOFDAY, unix.SYS_CLOCK_ADJTIME,
	// NUMA policies and page moves between nodes.
	unix.SYS_MBIND, unix.SYS_SET_MEMPOLICY, unix.SYS_GET_MEMPOLICY, unix.SYS_MOVE_PAGES,
	unix.SYS_SET_MEMPOLICY_HOME_NODE,
	// userfaultfd (a tool for kernel race exploits) and io_uring (calls
	// that no filter sees, one after another).
	unix.SYS_USERFAULTFD, unix.SYS_IO_URING_SETUP, unix.SYS_IO_URING_ENTER, unix.SYS_IO_URING_REGISTER,
	unix.SYS_VHANGUP,
}
