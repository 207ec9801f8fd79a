package container

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_X86_64
	// x32Bit marks the x32 ABI's numbers, which share the x86_64 entry.
	x32Bit = 0x40000000
	// cloneFlagsArg is clone's flags argument (x86_64: clone(flags, stack, ...)).
	cloneFlagsArg = 0
	// lastKnownSyscall is the newest call the filter was written knowing
	// (file_setattr, Linux 6.17); later ones fail with ENOSYS.
	lastKnownSyscall = unix.SYS_FILE_SETATTR
)

// deniedSyscalls fail with EPERM (see the filter's doc); the legacy calls
// the x86_64 kernel still numbers are listed too, though it answers most
// with ENOSYS itself.
var deniedSyscalls = append(commonDenied,
	unix.SYS_CREATE_MODULE, unix.SYS_GET_KERNEL_SYMS, unix.SYS_QUERY_MODULE,
	unix.SYS_IOPERM, unix.SYS_IOPL, unix.SYS_NFSSERVCTL, unix.SYS_SYSFS,
	unix.SYS__SYSCTL, unix.SYS_USELIB, unix.SYS_USTAT,
)
