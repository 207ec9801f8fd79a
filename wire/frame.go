package wire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
)

// Protocol v2 (docs/PROTOCOL.md): after the ack, both directions are
// frames. A frame is a type byte, the payload's length as a big-endian
// uint32, and the payload, at most MaxPayload bytes. A reader skips frame
// types it does not know, so that later versions can add some.
type FrameType byte

// The frame types.
const (
	FrameStdin  FrameType = 0x01 // client -> agent: bytes for the command's input
	FrameStdout FrameType = 0x02 // agent -> client: the command's output
	FrameStderr FrameType = 0x03 // agent -> client: the command's error output (pipes mode)
	FrameEOF    FrameType = 0x04 // the end of one stream: payload one byte, a Stream
	FrameResize FrameType = 0x05 // client -> agent: cols, rows (two big-endian uint16)
	FramePing   FrameType = 0x06 // either way: payload at most 8 bytes, echoed in the pong
	FramePong   FrameType = 0x07
	FrameExit   FrameType = 0x08 // agent -> client: how the command ended (Exit)
	FrameReason FrameType = 0x09 // agent -> client: the session's end reason, NUL, a message
	FrameHangup FrameType = 0x0a // client -> agent: the client is going: end the command
)

// Stream names a stream in an EOF frame.
type Stream byte

// The streams.
const (
	StreamStdin  Stream = 0
	StreamStdout Stream = 1
	StreamStderr Stream = 2
)

// HeaderLen is a frame's header: the type and the payload length.
const HeaderLen = 5

// MaxPayload bounds a frame's payload; a longer frame is a protocol error.
const MaxPayload = 64 << 10

// maxPing bounds a ping's payload.
const maxPing = 8

// ErrFrameTooLong is a frame over MaxPayload.
var ErrFrameTooLong = fmt.Errorf("v2 frame longer than %d bytes", MaxPayload)

// AppendFrame appends one frame to dst.
func AppendFrame(dst []byte, t FrameType, payload []byte) []byte {
	dst = append(dst, byte(t))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// FrameWriter writes frames to W, each in one Write (one TLS record or a
// few), safe for concurrent use: a pong never lands inside a data frame.
type FrameWriter struct {
	W   io.Writer
	mu  sync.Mutex
	buf []byte
}

// Write writes one frame; a payload over MaxPayload is split into frames
// of the same type.
func (w *FrameWriter) Write(t FrameType, payload []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for first := true; first || len(payload) > 0; first = false {
		n := min(len(payload), MaxPayload)
		w.buf = AppendFrame(w.buf[:0], t, payload[:n])
		payload = payload[n:]
		if _, err := w.W.Write(w.buf); err != nil {
			return err
		}
	}
	return nil
}

// FrameReader reads frames from a stream.
type FrameReader struct {
	r   *bufio.Reader
	buf []byte
}

// NewFrameReader reads frames from r.
func NewFrameReader(r io.Reader) *FrameReader {
	return &FrameReader{r: bufio.NewReaderSize(r, 16<<10)}
}

// Next reads the next frame. Its payload is valid until the next call.
// io.EOF is a clean end between frames; io.ErrUnexpectedEOF one inside a
// frame.
func (fr *FrameReader) Next() (FrameType, []byte, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(fr.r, h[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(h[1:])
	if n > MaxPayload {
		return 0, nil, ErrFrameTooLong
	}
	if cap(fr.buf) < int(n) {
		fr.buf = make([]byte, n)
	}
	p := fr.buf[:n]
	if _, err := io.ReadFull(fr.r, p); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	return FrameType(h[0]), p, nil
}

// Buffered is how many bytes the reader holds that were not read yet.
func (fr *FrameReader) Buffered() int { return fr.r.Buffered() }

// Resize is a resize frame's payload.
func Resize(cols, rows uint16) []byte {
	return binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint16(nil, cols), rows)
}

// ParseResize reads a resize frame's payload.
func ParseResize(p []byte) (cols, rows uint16, err error) {
	if len(p) < 4 {
		return 0, 0, fmt.Errorf("resize frame of %d bytes, want 4", len(p))
	}
	return binary.BigEndian.Uint16(p), binary.BigEndian.Uint16(p[2:]), nil
}

// ParsePing checks a ping's payload.
func ParsePing(p []byte) error {
	if len(p) > maxPing {
		return fmt.Errorf("ping frame of %d bytes, at most %d", len(p), maxPing)
	}
	return nil
}

// Exit is how the command ended: a code, or a signal (and whether it
// dumped core).
type Exit struct {
	Code       int
	Signal     int // 0: exited with Code
	CoreDumped bool
}

// Payload is the exit frame's payload: kind (0 code, 1 signal), the value
// as a big-endian uint32, core dumped (0 or 1).
func (e Exit) Payload() []byte {
	kind, v := byte(0), uint32(e.Code)
	if e.Signal != 0 {
		kind, v = 1, uint32(e.Signal)
	}
	core := byte(0)
	if e.CoreDumped {
		core = 1
	}
	return append(binary.BigEndian.AppendUint32([]byte{kind}, v), core)
}

// ParseExit reads an exit frame's payload.
func ParseExit(p []byte) (Exit, error) {
	if len(p) < 6 {
		return Exit{}, fmt.Errorf("exit frame of %d bytes, want 6", len(p))
	}
	v := int(binary.BigEndian.Uint32(p[1:]))
	e := Exit{CoreDumped: p[5] == 1}
	switch p[0] {
	case 0:
		e.Code = v
	case 1:
		if v == 0 || v > 127 {
			return Exit{}, fmt.Errorf("exit frame: signal %d out of range", v)
		}
		e.Signal, e.Code = v, 128+v
	default:
		return Exit{}, fmt.Errorf("exit frame: kind %d", p[0])
	}
	return e, nil
}

// ReasonPayload is a reason frame's payload.
func ReasonPayload(reason, message string) []byte {
	return []byte(reason + "\x00" + message)
}

// ParseReason reads a reason frame's payload.
func ParseReason(p []byte) (reason, message string) {
	reason, message, _ = strings.Cut(string(p), "\x00")
	return reason, message
}
