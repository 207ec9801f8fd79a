// Command attach-agent attaches a terminal to a one-off dyno through a
// Rendezvous relay. Sub-commands: attach (one session), demo (relay, session
// and client in one process), rendezvous (the relay), connect (the client),
// version. Logic lives in the packages; this file only wires flags.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/attach-agent/attach-agent/container"
	"github.com/attach-agent/attach-agent/daemon"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// Exit codes of the agent itself (a command's own status passes through).
const (
	exitOK       = 0
	exitFailure  = 1
	exitUsage    = 2
	exitAgentErr = 125
	exitLinkLost = 255 // connect: a v2 session's link ended before its status came
)

// usageError is a bad flag or argument: exit 2 with its message.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type stdio struct {
	in       io.Reader
	out, err io.Writer
}

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, io stdio) (int, error)
}

func commands() []command {
	return []command{
		{"attach", "run one command and attach it to a relay (one session, in the foreground)", runAttach},
		{"demo", "start a relay, a session and a client in one process: a live shell in seconds", runDemo},
		{"serve", "the per-worker daemon: sessions through a control API on a unix socket", runServe},
		{"drain", "end every session of the daemon (after a grace, with reason shutdown)", runDrain},
		{"rendezvous", "run a Rendezvous relay", runRendezvous},
		{"connect", "attach this terminal to a session through a relay (the client)", runConnect},
		{"version", "print the version", runVersion},
	}
}

func main() {
	container.Main() // when re-executed as a sandbox's init, that is all this process is
	daemon.Main()    // and so when re-executed as a session's worker
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], stdio{os.Stdin, os.Stdout, os.Stderr})
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, io stdio) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		topUsage(io.err)
		if len(args) == 0 {
			return exitUsage
		}
		return exitOK
	}
	for _, c := range commands() {
		if c.name != args[0] {
			continue
		}
		code, err := c.run(ctx, args[1:], io)
		var ue usageError
		switch {
		case errors.Is(err, flag.ErrHelp):
			return exitOK
		case errors.As(err, &ue):
			fmt.Fprintf(io.err, "attach-agent %s: %s\nRun 'attach-agent %s -h' for usage.\n", c.name, ue.msg, c.name)
			return exitUsage
		case err != nil:
			fmt.Fprintf(io.err, "attach-agent %s: %v\n", c.name, err)
		}
		return code
	}
	fmt.Fprintf(io.err, "attach-agent: unknown command %q\n", args[0])
	topUsage(io.err)
	return exitUsage
}

func topUsage(w io.Writer) {
	fmt.Fprintf(w, "Usage: attach-agent COMMAND [flags] [args]\n\nCommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-11s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun 'attach-agent COMMAND -h' for a command's flags and an example.\n")
}

// flagSet is a flag set whose errors become usage errors and whose -h
// prints the flags and an example.
type flagSet struct {
	*flag.FlagSet
	help func()
}

func newFlagSet(name, synopsis, example string, w io.Writer) *flagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported once, by run
	fs.Usage = func() {}     // the flag package calls it on every error
	help := func() {
		fmt.Fprintf(w, "Usage: attach-agent %s %s\n\nFlags:\n", name, synopsis)
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
		fmt.Fprintf(w, "\nExample:\n  %s\n", example)
	}
	return &flagSet{fs, help}
}

// parse parses flags; a bad flag is a usage error naming it.
func parse(fs *flagSet, args []string) error {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.help()
		return err
	}
	if err != nil {
		return usageError{err.Error()}
	}
	return nil
}

func runVersion(_ context.Context, args []string, io stdio) (int, error) {
	fs := newFlagSet("version", "", "attach-agent version", io.err)
	if err := parse(fs, args); err != nil {
		return exitUsage, err
	}
	if fs.NArg() > 0 {
		return exitUsage, usagef("unexpected argument %q", fs.Arg(0))
	}
	fmt.Fprintf(io.out, "attach-agent %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return exitOK, nil
}

// multiFlag collects a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
