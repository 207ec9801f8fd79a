// Package ptyio runs a command under a pty or plain pipes and moves bytes
// between it and a network stream with one goroutine per direction, under
// idle, stall, drain and duration bounds. It knows nothing of TLS, relays,
// HTTP or metrics: it is given an io.ReadWriter-like stream and a process
// spec, and it reports what happened.
package ptyio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// DefaultPath is the PATH a child gets when its environment has none.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// DefaultTerm is TERM for a child with a tty whose environment has none.
const DefaultTerm = "xterm-256color"

// Spec is what to run and how.
type Spec struct {
	Argv []string // program and arguments; Argv[0] is looked up in the child's PATH
	Env  []string // the child's whole environment (PATH and, with a tty, TERM are added when absent)
	Dir  string   // working directory; empty: the agent's
	TTY  bool     // run under a pty; false: plain pipes, stdout and stderr merged (unless SeparateStderr)
	Raw  bool     // with TTY: no echo, no CR/LF rewriting, no line editing or limit
	Cols uint16   // initial pty width; zero: 80
	Rows uint16   // initial pty height; zero: 24
	// SeparateStderr, in pipes mode, gives stderr a pipe of its own (the
	// pump copies it to Config.Stderr).
	SeparateStderr bool

	// SysProcAttr, when set, is the base for the child's attributes
	// (credentials, namespaces); Setsid and the controlling tty are set here.
	// With a Credential, the pty is handed to that user.
	SysProcAttr *syscall.SysProcAttr

	// Launch, when set, starts cmd in place of cmd.Start: inside another
	// container's namespaces, or under an init in a new one. cmd.Path is
	// not resolved yet (it is Argv[0]): Launch looks it up where the
	// command will run, with Resolve. Errors are reported as spawn errors.
	Launch func(cmd *exec.Cmd) error

	// Terminal, with TTY, is a pty opened ahead for this Spec with
	// OpenTerminal; Start takes it over (and closes it if it fails).
	// Nil: Start opens one.
	Terminal *Terminal
}

// Terminal is a pty opened and set up (size, raw mode) ahead of Start, so
// that a session can do it while its dial is on the wire, off the path to
// the first byte. Start takes it over; one that never reaches Start must
// be closed.
type Terminal struct {
	master *os.File // non-blocking, on Go's poller
	tty    *os.File
}

// OpenTerminal opens a pty sized and set up as spec says.
func OpenTerminal(spec Spec) (*Terminal, error) {
	ptmx, tty, err := pty.Open()
	if err != nil {
		return nil, fmt.Errorf("open pty: %w", err)
	}
	fail := func(what string, err error) (*Terminal, error) {
		_, _ = ptmx.Close(), tty.Close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	cols, rows := size(spec)
	if err := pty.Setsize(ptmx, &pty.Winsize{Cols: cols, Rows: rows}); err != nil {
		return fail("set pty size", err)
	}
	if spec.Raw {
		if _, err := term.MakeRaw(int(tty.Fd())); err != nil {
			return fail("raw pty", err)
		}
	}
	master, err := pollable(ptmx)
	if err != nil {
		_ = tty.Close()
		return nil, fmt.Errorf("pty master: %w", err)
	}
	return &Terminal{master: master, tty: tty}, nil
}

// Close closes both ends; a second Close does nothing.
func (t *Terminal) Close() {
	_, _ = t.master.Close(), t.tty.Close() // best effort: already closed is fine
}

// SpawnError is a command that could not be started. Code is the shell's
// convention: 127 not found, 126 found but not executable, 125 otherwise.
type SpawnError struct {
	Name string
	Code int
	Err  error
}

func (e *SpawnError) Error() string {
	switch e.Code {
	case 127:
		return fmt.Sprintf("%s: command not found", e.Name)
	case 126:
		return fmt.Sprintf("%s: not executable: %v", e.Name, e.Err)
	}
	return fmt.Sprintf("start %s: %v", e.Name, e.Err)
}

func (e *SpawnError) Unwrap() error { return e.Err }

// Process is a started command and our ends of its terminal or pipes.
type Process struct {
	cmd *exec.Cmd
	pid int

	// master is the pty master (TTY) or the read end of the output pipe;
	// input is the same master (TTY) or the write end of the stdin pipe.
	// Both are non-blocking and on Go's poller, so deadlines and Close
	// interrupt blocked reads and writes.
	master *os.File
	input  *os.File
	stderr *os.File // pipes mode with SeparateStderr
	tty    bool

	separateStderr bool
	raw            bool
	ptsDev         string
	launch         func(*exec.Cmd) error

	done    chan struct{}
	state   *os.ProcessState
	waitErr error
}

// Start starts the command. The parent's copy of the tty (or of the
// child's pipe ends) is closed before Start returns, so the master reads EIO
// (EOF) once every process holding the terminal has gone.
func Start(spec Spec) (p *Process, err error) {
	if t := spec.Terminal; t != nil {
		defer func() {
			if err != nil {
				t.Close()
			}
		}()
	}
	if len(spec.Argv) == 0 || spec.Argv[0] == "" {
		return nil, &SpawnError{Name: "''", Code: 127, Err: errors.New("empty command")}
	}
	env := withDefaults(spec)
	path := spec.Argv[0]
	if spec.Launch == nil {
		var err error
		if path, err = Resolve(spec.Argv[0], env, spec.Dir); err != nil {
			return nil, err
		}
	}
	attr := &syscall.SysProcAttr{}
	if spec.SysProcAttr != nil {
		c := *spec.SysProcAttr
		attr = &c
	}
	attr.Setsid = true // own session and process group: one signal reaches all of it
	cmd := &exec.Cmd{Path: path, Args: spec.Argv, Env: env, Dir: spec.Dir, SysProcAttr: attr}
	p = &Process{cmd: cmd, tty: spec.TTY, raw: spec.Raw, done: make(chan struct{}), launch: spec.Launch, separateStderr: spec.SeparateStderr && !spec.TTY}
	if spec.TTY {
		err = p.startPTY(spec)
	} else {
		err = p.startPipes()
	}
	if err != nil {
		return nil, spawnError(spec.Argv[0], err)
	}
	p.pid = cmd.Process.Pid
	go p.wait()
	return p, nil
}

func spawnError(name string, err error) error {
	var se *SpawnError
	if errors.As(err, &se) {
		return err
	}
	code := 125
	switch {
	case errors.Is(err, syscall.EPERM):
		// Not the program's fault: the agent may not switch to the user
		// (setuid, setgroups) or take the terminal. exec itself says
		// EACCES for a file it may not run.
		err = fmt.Errorf("%w (refused to the agent: switching users or groups needs root)", err)
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOENT):
		code = 127
	case errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.ENOEXEC):
		code = 126
	}
	return &SpawnError{Name: name, Code: code, Err: err}
}

func (p *Process) startPTY(spec Spec) error {
	t := spec.Terminal
	if t == nil {
		var err error
		if t, err = OpenTerminal(spec); err != nil {
			return err
		}
	}
	tty, master := t.tty, t.master
	defer func() { _ = tty.Close() }() // the child has its own copies after Start
	p.ptsDev = tty.Name()
	if c := p.cmd.SysProcAttr.Credential; c != nil {
		// The user's own terminal, as login gives it: programs that reopen
		// it by name (less, ssh, sudo) must be able to.
		if err := tty.Chown(int(c.Uid), -1); err != nil {
			_ = master.Close()
			return fmt.Errorf("hand the pty to uid %d: %w", c.Uid, err)
		}
	}
	p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = tty, tty, tty
	p.cmd.SysProcAttr.Setctty = true
	p.cmd.SysProcAttr.Ctty = 0 // the child's fd 0, the tty
	if err := p.start(); err != nil {
		_ = master.Close()
		return err
	}
	p.master, p.input = master, master
	return nil
}

// pollable swaps f, whose fd creack/pty left blocking (Fd() does that),
// for a non-blocking duplicate on Go's poller: then Close interrupts a
// blocked Read and deadlines work. f is closed.
func pollable(f *os.File) (*os.File, error) {
	defer func() { _ = f.Close() }()
	var nfd int
	var derr error
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	if err := rc.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if derr != nil {
		return nil, derr
	}
	if err := unix.SetNonblock(nfd, true); err != nil {
		_ = unix.Close(nfd)
		return nil, err
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}

func (p *Process) startPipes() error {
	inR, inW, err := os.Pipe()
	if err != nil {
		return err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		_, _ = inR.Close(), inW.Close()
		return err
	}
	p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = inR, outW, outW
	var errR, errW *os.File
	if p.separateStderr {
		if errR, errW, err = os.Pipe(); err != nil {
			_, _, _, _ = inR.Close(), inW.Close(), outR.Close(), outW.Close()
			return err
		}
		p.cmd.Stderr = errW
	}
	err = p.start()
	_, _ = inR.Close(), outW.Close() // the child's ends
	if errW != nil {
		_ = errW.Close()
	}
	if err != nil {
		_, _ = inW.Close(), outR.Close()
		if errR != nil {
			_ = errR.Close()
		}
		return err
	}
	p.master, p.input, p.stderr = outR, inW, errR
	return nil
}

func (p *Process) start() error {
	if p.launch != nil {
		return p.launch(p.cmd)
	}
	return p.cmd.Start()
}

func (p *Process) wait() {
	p.state, p.waitErr = p.cmd.Process.Wait()
	close(p.done)
}

// Pid is the process id (also its process group and session id).
func (p *Process) Pid() int { return p.pid }

// Done is closed when the main process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitStatus is the status after Done: the exit code, or 128+N when killed
// by signal N (the shell's convention), and the signal (0 if none).
func (p *Process) ExitStatus() (code int, sig syscall.Signal) {
	<-p.done
	if p.state == nil {
		return 125, 0
	}
	if ws, ok := p.state.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), ws.Signal()
	}
	return p.state.ExitCode(), 0
}

// CoreDumped reports, after Done, whether a signal that ended the process
// made it dump core.
func (p *Process) CoreDumped() bool {
	<-p.done
	if p.state == nil {
		return false
	}
	ws, ok := p.state.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.CoreDump()
}

// Resize sets the pty's window size (a no-op in pipes mode): the command
// gets SIGWINCH from the kernel.
func (p *Process) Resize(cols, rows uint16) error {
	if !p.tty || cols == 0 || rows == 0 {
		return nil
	}
	return pty.Setsize(p.master, &pty.Winsize{Cols: cols, Rows: rows})
}

// Signal sends sig to the whole process group; a group already gone is not
// an error.
func (p *Process) Signal(sig syscall.Signal) error {
	err := syscall.Kill(-p.pid, sig)
	if errors.Is(err, syscall.ESRCH) {
		return nil
	}
	return err
}

// GroupAlive reports whether any process of the group is still there
// (zombies waiting for their parent count as gone).
func (p *Process) GroupAlive() bool {
	if syscall.Kill(-p.pid, 0) != nil {
		return false
	}
	return anyLiveInGroup(p.pid)
}

// anyLiveInGroup scans /proc for a non-zombie process in group pgid.
func anyLiveInGroup(pgid int) bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true // cannot tell: assume alive
	}
	for _, e := range ents {
		name := e.Name()
		if name[0] < '0' || name[0] > '9' {
			continue
		}
		b, err := os.ReadFile("/proc/" + name + "/stat")
		if err != nil {
			continue
		}
		// The fields after the command (which is in parentheses) are
		// state, ppid, pgrp.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 3 && f[2] == fmt.Sprint(pgid) && f[0] != "Z" && f[0] != "X" {
			return true
		}
	}
	return false
}

// Close releases our ends of the terminal or pipes. It does not signal the
// process: use Signal first.
func (p *Process) Close() error {
	err := p.master.Close()
	if p.input != p.master {
		err = errors.Join(err, p.input.Close())
	}
	if p.stderr != nil {
		err = errors.Join(err, p.stderr.Close())
	}
	return err
}

// withDefaults is the child's whole environment: the given one plus PATH
// and, with a tty, TERM, COLUMNS and LINES, each only when absent. Nothing
// of the agent's own environment gets in.
func withDefaults(spec Spec) []string {
	out := append([]string(nil), spec.Env...)
	add := func(k, v string) {
		if !HasKey(out, k) {
			out = append(out, k+"="+v)
		}
	}
	add("PATH", DefaultPath)
	if spec.TTY {
		cols, rows := size(spec)
		add("TERM", DefaultTerm)
		add("COLUMNS", fmt.Sprint(cols))
		add("LINES", fmt.Sprint(rows))
	}
	return out
}

func size(spec Spec) (cols, rows uint16) {
	cols, rows = spec.Cols, spec.Rows
	if cols == 0 {
		cols = 80
	}
	if rows == 0 {
		rows = 24
	}
	return cols, rows
}

// HasKey reports whether env (KEY=VALUE entries) sets key.
func HasKey(env []string, key string) bool {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == key {
			return true
		}
	}
	return false
}

func envValue(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val // the last one wins, as in exec
		}
	}
	return v
}

// Resolve is where a command's program is, as its exec will see it: the
// working directory checked (CheckDir), then name looked up in the PATH of
// env, the child's environment (LookPath). Call it where the command will
// run (inside a container's root when it runs in one).
func Resolve(name string, env []string, dir string) (string, error) {
	if err := CheckDir(name, dir); err != nil {
		return "", err
	}
	return LookPath(name, envValue(env, "PATH"), dir)
}

// CheckDir fails clearly for a working directory that is not there: exec
// would report its ENOENT as the program's ("command not found").
func CheckDir(name, dir string) error {
	if dir == "" {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return &SpawnError{Name: name, Code: 125, Err: fmt.Errorf("working directory: %w", err)}
	}
	if !st.IsDir() {
		return &SpawnError{Name: name, Code: 125, Err: fmt.Errorf("working directory %s: not a directory", dir)}
	}
	return nil
}

// LookPath finds name in the child's PATH (not the agent's), relative to
// dir for a name with a slash, on the filesystem the caller sees.
func LookPath(name, path, dir string) (string, error) {
	if strings.Contains(name, "/") {
		full := name
		if !filepath.IsAbs(full) && dir != "" {
			full = filepath.Join(dir, full)
		}
		if err := executable(full); err != nil {
			return "", spawnError(name, err)
		}
		return full, nil
	}
	var firstErr error
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		full := filepath.Join(d, name)
		err := executable(full)
		if err == nil {
			return full, nil
		}
		if !errors.Is(err, fs.ErrNotExist) && firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return "", spawnError(name, firstErr)
	}
	return "", &SpawnError{Name: name, Code: 127, Err: fs.ErrNotExist}
}

func executable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return fmt.Errorf("is a directory: %w", fs.ErrPermission)
	}
	if st.Mode()&0o111 == 0 {
		return fmt.Errorf("no execute permission: %w", fs.ErrPermission)
	}
	return nil
}

// CloseInput gives the process end of input. With pipes it closes the
// stdin pipe. With a pty it types VEOF, twice when a line is in progress
// (the first ends the line, the second reads as EOF). A raw pty has no
// in-band EOF, so once the process has read what was queued, the line
// discipline is switched back to canonical mode (echo and output
// processing stay off) and VEOF is typed. lastByte is the last byte
// written to the process, or -1.
func (p *Process) CloseInput(lastByte int, settle time.Duration) error {
	if !p.tty {
		return p.input.Close()
	}
	rc, err := p.master.SyscallConn()
	if err != nil {
		return err
	}
	var tio *unix.Termios
	var terr error
	if err := rc.Control(func(fd uintptr) { tio, terr = unix.IoctlGetTermios(int(fd), unix.TCGETS) }); err != nil {
		return err
	}
	if terr != nil {
		return fmt.Errorf("read pty modes: %w", terr)
	}
	if p.raw && tio.Lflag&unix.ICANON == 0 {
		p.waitInputRead(settle)
		tio.Lflag |= unix.ICANON
		if err := rc.Control(func(fd uintptr) { terr = unix.IoctlSetTermios(int(fd), unix.TCSETS, tio) }); err != nil {
			return err
		}
		if terr != nil {
			return fmt.Errorf("canonical mode for EOF: %w", terr)
		}
		// A read already blocked in non-canonical mode waits for VMIN bytes
		// and would swallow the VEOF without ending: stop the group (which
		// takes the read back), type VEOF, continue; the read restarts
		// under canonical rules and returns 0, as after Ctrl-Z and fg.
		resume := p.stop()
		_, err := p.master.Write([]byte{tio.Cc[unix.VEOF]})
		resume()
		return err
	}
	eof := []byte{tio.Cc[unix.VEOF]}
	if lastByte >= 0 && lastByte != '\n' && lastByte != '\r' {
		eof = append(eof, eof[0])
	}
	_, err = p.master.Write(eof)
	return err
}

// stop sends SIGSTOP to the terminal's foreground process group (the one
// whose read is to be taken back: the command's own group, or a job a
// shell runs, or the command under a sandbox's init) and waits (bounded)
// until its leader is stopped; the returned func sends SIGCONT.
func (p *Process) stop() (resume func()) {
	pgrp := p.pid
	if rc, err := p.master.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) {
			if fg, err := unix.IoctlGetInt(int(fd), unix.TIOCGPGRP); err == nil && fg > 0 {
				pgrp = fg
			}
		})
	}
	if err := syscall.Kill(-pgrp, syscall.SIGSTOP); err != nil {
		return func() {}
	}
	resume = func() { _ = syscall.Kill(-pgrp, syscall.SIGCONT) } // gone is fine
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pgrp))
		if err != nil {
			return resume
		}
		s := string(b)
		if f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:]); len(f) > 0 && (f[0] == "T" || f[0] == "Z") {
			return resume
		}
		time.Sleep(time.Millisecond)
	}
	return resume
}

// waitInputRead waits, up to settle, until the process has read the input
// queued on its terminal, so the switch to canonical mode cannot cut a
// pending line.
func (p *Process) waitInputRead(settle time.Duration) {
	f, err := os.OpenFile(p.ptsDev, os.O_RDWR|unix.O_NOCTTY|unix.O_NONBLOCK, 0)
	if err != nil {
		return
	}
	defer func() { _ = f.Close() }() // best effort
	deadline := time.Now().Add(settle)
	for zero := 0; zero < 2 && time.Now().Before(deadline); {
		if queued(f, unix.TIOCINQ) == 0 {
			zero++
		} else {
			zero = 0
		}
		time.Sleep(5 * time.Millisecond) // bounded by settle; the kernel gives no event for this
	}
}
