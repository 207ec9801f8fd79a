package ptyio

import (
	"errors"
	"io"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// outputReader reads a process's output for the pump.
type outputReader struct {
	rc syscall.RawConn
	// gather > 0 is for a pty master: after a full-size read, wait up to
	// gather for the kernel to queue more (see awaitQueued) rather than
	// read an empty master, which sleeps until the tty's flush work has
	// run. That sleep and its wake-up, once per 4 KiB, cost more CPU than
	// the wait and halve a pty's throughput (docs/BENCHMARKS.md).
	gather time.Duration
	// streaming: the last read filled the buffer, so the next one waits
	// for the queue the same way before its first read.
	streaming bool
	// foundEmpty: the last read found the queue empty at some point
	// (EAGAIN; a pty master's read first waits for the tty's flush work,
	// so nothing is held back either).
	foundEmpty bool
}

// read blocks until there is output, then reads what is there now, up to
// len(buf), in as many read calls as it takes (a pty read returns about
// 4 KiB at most). Bigger chunks mean fewer TLS records and syscalls on the
// other side. EIO from a pty master, which Linux returns once every holder
// of the slave has gone, is io.EOF.
func (r *outputReader) read(buf []byte) (int, error) {
	n := 0
	var rerr error
	r.foundEmpty = false
	cerr := r.rc.Read(func(fd uintptr) bool {
		if n == 0 && r.streaming && r.gather > 0 {
			awaitQueued(int(fd), r.gather) // if nothing comes, the read below parks as usual
		}
		for n < len(buf) {
			m, e := unix.Read(int(fd), buf[n:])
			switch {
			case m > 0:
				n += m
				if m < smallRead {
					return true // the queue is surely empty: skip the EAGAIN read (latency)
				}
				if r.gather > 0 && n < len(buf) && !awaitQueued(int(fd), r.gather) {
					return true // nothing more came in time: send what we have
				}
			case e == unix.EINTR:
			case e == unix.EAGAIN:
				r.foundEmpty = true
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
	r.streaming = n == len(buf)
	return n, rerr
}

// awaitQueued polls a pty master's input queue (TIOCINQ, which never
// sleeps) for up to d and reports whether it holds bytes: busy polling,
// bounded, in the way of SO_BUSY_POLL for sockets. Under a stream the
// tty's worker moves the next 4 KiB into the queue within microseconds of
// the previous read. An error reads as "queued" so that the read that
// follows reports it.
func awaitQueued(fd int, d time.Duration) bool {
	var start time.Time
	for {
		v, err := unix.IoctlGetInt(fd, unix.TIOCINQ)
		if err != nil || v > 0 {
			return true
		}
		if start.IsZero() {
			start = time.Now()
		} else if time.Since(start) >= d {
			return false
		}
	}
}

// gatherWait bounds the busy polling of a streaming pty (outputReader);
// BENCHMARKS.md has the figures behind it.
const gatherWait = 50 * time.Microsecond

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
