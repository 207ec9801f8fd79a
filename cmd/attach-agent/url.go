package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/attach-agent/attach-agent/tlsdial"
)

// urlEnv is where attach and connect take the attach URL from by default:
// the URL holds the session's secret, and a command line is anyone's to
// read (ps, /proc/PID/cmdline), while the environment is the process
// owner's.
const urlEnv = "ATTACH_URL"

// urlSource is the flag and environment variable that name the attach URL.
type urlSource struct{ file string }

func (u *urlSource) register(fs *flagSet) {
	fs.StringVar(&u.file, "url-file", "", "read ATTACH_URL from `FILE` (- for stdin) instead of the environment variable "+urlEnv)
}

// resolve picks the attach URL: --url-file, else $ATTACH_URL, else the
// first positional argument (when positional says there is one), which
// works but is warned about. It returns the arguments left and unsets
// ATTACH_URL, so nothing this process starts inherits it.
func (u *urlSource) resolve(args []string, positional bool, in io.Reader, stderr io.Writer) (tlsdial.URL, []string, error) {
	raw, from := "", ""
	if positional && len(args) > 0 && (u.file != "" || os.Getenv(urlEnv) != "") {
		// It would otherwise be taken for the command, and named in its
		// errors: a secret in the logs.
		return tlsdial.URL{}, args, usagef("the attach URL is given twice: as an argument and in %s or --url-file; drop the argument", urlEnv)
	}
	switch {
	case u.file != "":
		var r io.Reader = in
		if u.file != "-" {
			f, err := os.Open(u.file)
			if err != nil {
				return tlsdial.URL{}, args, usagef("--url-file: %v", err)
			}
			defer func() { _ = f.Close() }()
			r = f
		}
		line, err := bufio.NewReader(io.LimitReader(r, 64<<10)).ReadString('\n')
		if err != nil && err != io.EOF {
			return tlsdial.URL{}, args, usagef("--url-file %s: %v", u.file, err)
		}
		raw, from = strings.TrimSpace(line), "--url-file "+u.file
	case os.Getenv(urlEnv) != "":
		raw, from = os.Getenv(urlEnv), urlEnv
	case positional && len(args) > 0:
		raw, args = args[0], args[1:]
		fmt.Fprintf(stderr, "attach-agent: warning: the attach URL on the command line is readable by every local user (ps, /proc/PID/cmdline), who could pair first and take the session: pass it in %s or with --url-file instead\n", urlEnv)
	default:
		return tlsdial.URL{}, args, usagef("missing ATTACH_URL: set %s, or give --url-file FILE (- for stdin)", urlEnv)
	}
	_ = os.Unsetenv(urlEnv)
	if raw == "" {
		return tlsdial.URL{}, args, usagef("%s: empty attach URL", from)
	}
	url, err := tlsdial.Parse(raw)
	if err != nil {
		return tlsdial.URL{}, args, usageError{fmt.Sprintf("%s: %v", from, err)}
	}
	return url, args, nil
}
