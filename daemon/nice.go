package daemon

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// A spare's start and warm-up (about 11 ms of CPU: the Go runtime, a TLS
// handshake in miniature) run spareNice steps nicer than the daemon, so
// that on a small host they take the CPU that sessions setting up leave.
// The spare takes the daemon's priority back, every thread of it, before
// it waits for its order: the command it starts inherits the priority of
// the thread that forks it, and must run as every session's command does.
// Lowering a nice value back needs CAP_SYS_NICE: without it, spares start
// as the daemon does.
const spareNice = 10

// capSysNice is CAP_SYS_NICE's bit.
const capSysNice = 23

// canRenice reports whether this process may lower its threads' nice
// values (CAP_SYS_NICE in its effective set).
func canRenice() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[0].Effective&(1<<capSysNice) != 0
}

// threadNice is thread tid's nice value (0: the calling thread's).
func threadNice(tid int) (int, error) {
	raw, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	return 20 - raw, err // the system call's 40..1 for nice -20..19
}

// startNiced starts cmd from the calling thread made spareNice steps nicer
// than nice, for the fork only.
func startNiced(cmd *exec.Cmd, nice int) error {
	runtime.LockOSThread()
	tid := unix.Gettid()
	if err := unix.Setpriority(unix.PRIO_PROCESS, tid, min(nice+spareNice, 19)); err != nil {
		runtime.UnlockOSThread()
		return cmd.Start()
	}
	err := cmd.Start()
	if unix.Setpriority(unix.PRIO_PROCESS, tid, nice) == nil {
		runtime.UnlockOSThread()
	} // else the thread stays this goroutine's alone (keepSpares'), never another's
	return err
}

// reniceSelf sets every thread of this process to nice. A thread started
// while it runs inherits from one set already, or is set in a later pass:
// it ends after two passes in a row, 200 µs apart, found every thread right
// (a thread being cloned is listed only once its clone is done).
func reniceSelf(nice int) error {
	clean := 0
	for range 8 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		changed := false
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if n, err := threadNice(tid); err != nil || n == nice {
				continue // gone, or right already
			}
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("thread %d to nice %d: %w", tid, nice, err)
			}
			changed = true
		}
		if changed {
			clean = 0
		} else if clean++; clean == 2 {
			return nil
		}
		time.Sleep(200 * time.Microsecond) // a clone in flight is done by then
	}
	return errors.New("threads still started at another priority after eight passes")
}

// commandAt makes sure the command pid runs at nice, which it took from
// the thread that forked it (reniceSelf set them all; this is the check).
func commandAt(pid, nice int) error {
	if n, err := threadNice(pid); err != nil || n == nice {
		return nil // gone already, or right
	}
	return unix.Setpriority(unix.PRIO_PROCESS, pid, nice)
}
