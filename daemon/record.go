package daemon

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/attach-agent/attach-agent/agent"
	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/ptyio"
)

// A session's record is a directory, STATE/sessions/ID, mode 0700, that its
// worker writes and any daemon reads:
//
//	worker.json   the worker (pid and start time) and the session, never its secret
//	control.sock  the worker's control socket (protocol in proto.go)
//	command.json  the command's pid and start time, once it runs
//	result.json   how the session ended, written before the worker exits
//	reported      made (O_EXCL) by the one daemon that logs the end
//
// Files are written whole to a temporary name and renamed, so a reader
// never sees half of one; the record itself appears whole too (see
// placePrefix).
const (
	workerFile   = "worker.json"
	controlFile  = "control.sock"
	commandFile  = "command.json"
	resultFile   = "result.json"
	reportedFile = "reported"
)

// A worker makes its record's directory before its order comes, under a
// name no session has: STATE/sessions/.spare-XXXXXXXXXXX (placePrefix and
// 11 hex digits, as long as an ID, so that its control socket's path fits
// wherever a record's does), with its control socket in it. At the order
// it writes worker.json there and renames the directory to the session's
// ID: the record appears with its worker.json and its socket at once, and
// the way to the session's first byte makes neither directory nor socket
// (about 70 µs). A daemon reads nothing in a place. It removes its spares' places
// when it ends them, a spare its own when it leaves without an order, and
// a daemon's scan one that is none of its spares', old, and that nobody
// answers on (a spare killed with its daemon).
const (
	placePrefix = ".spare-"
	placeDigits = 11
)

// newPlace names a spare's place.
func newPlace() string {
	b := make([]byte, (placeDigits+1)/2)
	_, _ = rand.Read(b)
	return placePrefix + hex.EncodeToString(b)[:placeDigits]
}

// validPlace reports whether name is a place as newPlace makes them.
func validPlace(name string) bool {
	digits, ok := strings.CutPrefix(name, placePrefix)
	return ok && len(digits) == placeDigits && strings.Trim(digits, "0123456789abcdef") == ""
}

// publish renames a worker's place to its session's record dir, never
// over something there (RENAME_NOREPLACE; on a filesystem without it, a
// plain rename after a check that dir is not there: IDs are random, and
// only the daemon that reserved one hands it out).
func publish(place, dir string) error {
	err := unix.Renameat2(unix.AT_FDCWD, place, unix.AT_FDCWD, dir, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		if _, serr := os.Lstat(dir); !errors.Is(serr, os.ErrNotExist) {
			return fmt.Errorf("%s: there already, or not to be checked (%v)", dir, serr)
		}
		return os.Rename(place, dir)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: place, New: dir, Err: err}
	}
	return nil
}

// recordVersion is the record's and the control protocol's version. A
// daemon reads the records of older workers: an upgraded daemon adopts the
// workers of the version before it.
const recordVersion = 1

// record is worker.json.
type record struct {
	V          int             `json:"v"`
	ID         string          `json:"id"`
	PID        int             `json:"pid"`
	Start      string          `json:"start"` // container.StartTime of PID
	StartedAt  time.Time       `json:"started_at"`
	About      agent.About     `json:"about"`
	SecretHash string          `json:"secret_hmac"` // for the duplicate check (secretHash)
	Container  *container.Spec `json:"container,omitempty"`
	Place      string          `json:"place"` // host, join, sandbox: the spawn histogram's label
}

// process names one process for good: a pid and its start time.
type process struct {
	PID   int    `json:"pid"`
	Start string `json:"start"`
}

// alive reports whether p is still the process it names (a reused pid is
// another process).
func (p process) alive() bool {
	st, err := container.StartTime(p.PID)
	return err == nil && st == p.Start
}

// result is result.json: agent.Result with its error as text.
type result struct {
	Reason   ptyio.Reason   `json:"reason"`
	ExitCode int            `json:"exit_code"`
	Signal   syscall.Signal `json:"signal,omitempty"`
	Started  bool           `json:"command_ran"`
	BytesIn  int64          `json:"bytes_in"`
	BytesOut int64          `json:"bytes_out"`
	Empty    int64          `json:"empty_reads,omitempty"`
	Timings  agent.Timings  `json:"timings"`
	SlowDial bool           `json:"slow_dial,omitempty"`
	Err      string         `json:"error,omitempty"`
	EndedAt  time.Time      `json:"ended_at"`
}

func resultOf(r agent.Result, at time.Time) result {
	out := result{Reason: r.Reason, ExitCode: r.ExitCode, Signal: r.Signal, Started: r.Started, BytesIn: r.BytesIn,
		BytesOut: r.BytesOut, Empty: r.Empty, Timings: r.Timings, SlowDial: r.SlowDial, EndedAt: at}
	if r.Err != nil {
		out.Err = r.Err.Error()
	}
	return out
}

func (r result) agentResult() agent.Result {
	out := agent.Result{Reason: r.Reason, ExitCode: r.ExitCode, Signal: r.Signal, Started: r.Started, BytesIn: r.BytesIn,
		BytesOut: r.BytesOut, Empty: r.Empty, Timings: r.Timings, SlowDial: r.SlowDial}
	if r.Err != "" {
		out.Err = errors.New(r.Err)
	}
	return out
}

// writeFile writes v as JSON to dir/name through a temporary file and a
// rename.
func writeFile(dir, name string, v any) error {
	b, err := encodeFile(v)
	if err != nil {
		return err
	}
	if len(b) > maxRecordFile {
		return fmt.Errorf("%s would be %d bytes, over the %d a daemon reads", name, len(b), maxRecordFile)
	}
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, name))
}

// encodeFile is a record file's content: v's JSON, one line.
func encodeFile(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // <, > and & as themselves: a record is not HTML
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// maxRecordFile bounds a record's file, written and read. A request is at
// most MaxRequestBody and specFor bounds its labels, so a record is far
// below it.
const maxRecordFile = 4 << 20

// readFile reads dir/name's JSON into v.
func readFile(dir, name string, v any) error {
	// No link is followed: a record's files are regular files of ours.
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxRecordFile {
		return fmt.Errorf("%s: not a regular file under %d bytes", f.Name(), maxRecordFile)
	}
	b := make([]byte, fi.Size())
	if _, err := f.ReadAt(b, 0); err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", f.Name(), err)
	}
	return nil
}

// claimReport makes dir's reported marker; only the first caller gets
// true, so that one daemon alone logs a session's end.
func claimReport(dir string) bool {
	f, err := os.OpenFile(filepath.Join(dir, reportedFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return false
	}
	_ = f.Close()
	return true
}

// makeStateDir makes STATE/sessions, owned by us and closed to others
// (records name relays and users; control sockets end sessions).
func makeStateDir(cfg Config) error {
	dir := cfg.sessionsDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return &ConfigError{"--state-dir", err.Error()}
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return &ConfigError{"--state-dir", err.Error()}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok || int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
		return &ConfigError{"--state-dir", fmt.Sprintf("%s must be a directory of ours with mode 0700 (it holds the sessions' control sockets); fix it or pick another --state-dir", dir)}
	}
	// Nobody else may swap a directory on the way to it for a link: the
	// daemon removes ended records under it, as root.
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		fi, err := os.Lstat(d)
		if err != nil {
			return &ConfigError{"--state-dir", err.Error()}
		}
		ok := closedToOthers(fi)
		if fi.Mode()&os.ModeSymlink != 0 {
			real, err := filepath.EvalSymlinks(d)
			ok = err == nil && safeDir(real)
		}
		if !ok {
			return &ConfigError{"--state-dir", fmt.Sprintf("%s may be changed by others (mode %v): pick a --state-dir whose every parent is root's and closed to others, such as /run/attach-agent", d, fi.Mode())}
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// safeDir reports whether dir and each of its parents are closed to others.
func safeDir(dir string) bool {
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Lstat(d)
		if err != nil || !closedToOthers(fi) {
			return false
		}
		if d == filepath.Dir(d) {
			return true
		}
	}
}

// closedToOthers: a directory of root's or ours that nobody else may write,
// or a sticky one (as /tmp) where others may add names but not move ours.
func closedToOthers(fi os.FileInfo) bool {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() || st.Uid != 0 && int(st.Uid) != os.Geteuid() {
		return false
	}
	return fi.Mode().Perm()&0o022 == 0 || fi.Mode()&os.ModeSticky != 0
}

// hostKey is STATE/key, 32 random bytes made by the first daemon of a boot
// (the state directory is a tmpfs) and read by the next: the key of the
// secrets' HMACs in records, so that two daemons compare them alike.
func hostKey(cfg Config) ([]byte, error) {
	path := filepath.Join(cfg.StateDir, "key")
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err == nil {
		_, werr := f.Write(key)
		if cerr := f.Close(); werr == nil {
			werr = cerr
		}
		if werr != nil {
			return nil, &ConfigError{"--state-dir", werr.Error()}
		}
		return key, nil
	}
	if !os.IsExist(err) {
		return nil, &ConfigError{"--state-dir", err.Error()}
	}
	f, err = os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, &ConfigError{"--state-dir", err.Error()}
	}
	defer f.Close()
	n, err := io.ReadFull(f, key)
	if err != nil || n != len(key) {
		return nil, &ConfigError{"--state-dir", fmt.Sprintf("%s: not a 32-byte key (%v): remove it, it is made again", path, err)}
	}
	return key, nil
}
