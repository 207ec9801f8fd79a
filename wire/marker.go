package wire

import (
	"bytes"
	"io"
	"strconv"
)

// markerPrefix starts the exit-status line the Heroku CLI looks for:
// U+FFFF, a space, and the tag. The status digits and a line end follow.
const markerPrefix = "\uFFFF heroku-command-exit-status: "

// maxStatusDigits bounds how long a would-be marker is held back.
const maxStatusDigits = 10

// ExitStatusLine is the marker line a dyno side writes after all output.
// It must go out in one write so no reader sees it split.
func ExitStatusLine(code int) string {
	return markerPrefix + strconv.Itoa(code) + "\n"
}

// StatusFilter passes a stream through to W, taking out exit-status marker
// lines and remembering the status. A marker split across writes is held
// back until it is whole or proves not to be one, so output is never lost
// and never reordered. Call Flush at the end of the stream.
type StatusFilter struct {
	W      io.Writer
	Status int  // the last marker's status
	Found  bool // whether a marker was seen
	hold   []byte
}

// Write implements io.Writer. It reports len(p) on success: held bytes are
// written later, by a later Write or by Flush.
func (f *StatusFilter) Write(p []byte) (int, error) {
	data := p
	if len(f.hold) > 0 {
		f.hold = append(f.hold, p...)
		data = f.hold
	}
	out, rest := f.scan(data)
	if len(out) > 0 {
		if err := f.writeOut(out); err != nil {
			return 0, err
		}
	}
	f.hold = append(f.hold[:0:0], rest...)
	return len(p), nil
}

// writeOut writes out, skipping whole marker lines.
func (f *StatusFilter) writeOut(b []byte) error {
	for len(b) > 0 {
		i := bytes.Index(b, []byte(markerPrefix))
		if i < 0 {
			_, err := f.W.Write(b)
			return err
		}
		if i > 0 {
			if _, err := f.W.Write(b[:i]); err != nil {
				return err
			}
		}
		end, code, ok := parseMarker(b[i:])
		if !ok { // not a marker after all: pass its first byte and go on
			if _, err := f.W.Write(b[i : i+1]); err != nil {
				return err
			}
			b = b[i+1:]
			continue
		}
		f.Status, f.Found = code, true
		b = b[i+end:]
	}
	return nil
}

// scan splits data into what can be decided now and a tail that may be the
// start of a marker still arriving.
func (f *StatusFilter) scan(data []byte) (out, rest []byte) {
	// Look for the last place a marker could begin and still be incomplete.
	start := bytes.LastIndexByte(data, markerPrefix[0])
	if start < 0 {
		return data, nil
	}
	tail := data[start:]
	if len(tail) < len(markerPrefix) {
		if bytes.HasPrefix([]byte(markerPrefix), tail) {
			return data[:start], tail
		}
		return data, nil
	}
	if !bytes.HasPrefix(tail, []byte(markerPrefix)) {
		return data, nil
	}
	digits := tail[len(markerPrefix):]
	for i, c := range digits {
		if c >= '0' && c <= '9' && i < maxStatusDigits {
			continue
		}
		if c == '\r' && i > 0 && i == len(digits)-1 {
			return data[:start], tail // "\n" may follow
		}
		return data, nil // complete, or not a marker: decide now
	}
	return data[:start], tail
}

// parseMarker reads "<prefix>DIGITS[\r]\n" at the start of b and returns
// the length of the line and the status.
func parseMarker(b []byte) (n, code int, ok bool) {
	rest := b[len(markerPrefix):]
	i := 0
	for i < len(rest) && i < maxStatusDigits && rest[i] >= '0' && rest[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, 0, false
	}
	code, err := strconv.Atoi(string(rest[:i]))
	if err != nil {
		return 0, 0, false
	}
	j := i
	if j < len(rest) && rest[j] == '\r' {
		j++
	}
	if j < len(rest) && rest[j] == '\n' {
		return len(markerPrefix) + j + 1, code, true
	}
	if j == len(rest) { // a marker at the very end of the stream, no line end
		return len(markerPrefix) + j, code, true
	}
	return 0, 0, false
}

// Flush writes whatever is held back (a partial marker at end of stream is
// taken as a marker if it is complete, else passed through as data).
func (f *StatusFilter) Flush() error {
	if len(f.hold) == 0 {
		return nil
	}
	h := f.hold
	f.hold = nil
	return f.writeOut(h)
}
