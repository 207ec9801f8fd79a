package container

import "golang.org/x/sys/unix"

const (
	auditArch        = unix.AUDIT_ARCH_AARCH64
	x32Bit           = 0 // no second ABI on the same entry
	cloneFlagsArg    = 0 // clone(flags, stack, ...)
	lastKnownSyscall = unix.SYS_FILE_SETATTR
)

var deniedSyscalls = commonDenied
