package ptyio

import (
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// readAvailable blocks until f has data, then reads what is there now, up
// to len(buf), in as many read calls as it takes (a pty read returns about
// 4 KiB at most). Bigger chunks mean fewer TLS records and syscalls on the
// other side. EIO from a pty master, which Linux returns once every holder
// of the slave has gone, is io.EOF.
func readAvailable(rc syscall.RawConn, buf []byte) (int, error) {
	n := 0
	var rerr error
	cerr := rc.Read(func(fd uintptr) bool {
		for n < len(buf) {
			m, e := unix.Read(int(fd), buf[n:])
			switch {
			case m > 0:
				n += m
				if m < smallRead {
					return true // the queue is surely empty: skip the EAGAIN read (latency)
				}
			case e == unix.EINTR:
			case e == unix.EAGAIN:
				return n > 0 // nothing yet: let the poller wait
			case e == unix.EIO || (m == 0 && e == nil):
				rerr = io.EOF
				return true
			default:
				rerr = e
				return true
			}
		}
		return true
	})
	if cerr != nil && rerr == nil {
		rerr = cerr
	}
	return n, rerr
}

// smallRead: a read this short drained what the pty had.
const smallRead = 512

// queued reports bytes waiting in a kernel queue of fd: FIONREAD (unread
// input) or TIOCOUTQ/SIOCOUTQ (unsent output). Errors read as zero.
func queued(c syscall.Conn, req uint) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return 0
	}
	n := 0
	_ = rc.Control(func(fd uintptr) {
		v, err := unix.IoctlGetInt(int(fd), req)
		if err == nil {
			n = v
		}
	})
	return n
}

// SocketUnsent returns a function that reports the bytes a TCP socket has
// not yet had acknowledged (SIOCOUTQ): output still on its way is activity,
// not idleness.
func SocketUnsent(c syscall.Conn) func() int {
	return func() int { return queued(c, unix.SIOCOUTQ) }
}

// isTimeout reports a deadline error.
func isTimeout(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }

// clock is the activity clock both directions share: the last time a
// byte moved, as nanoseconds since the session's start.
type clock struct {
	base time.Time
	last int64 // atomic
}
