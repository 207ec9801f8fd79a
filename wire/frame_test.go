package wire_test

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/attach-agent/attach-agent/wire"
)

func TestFramesRoundTrip(t *testing.T) {
	var b bytes.Buffer
	w := &wire.FrameWriter{W: &b}
	big := bytes.Repeat([]byte{0x04, 0xff}, wire.MaxPayload) // two frames' worth
	for _, f := range []struct {
		t wire.FrameType
		p []byte
	}{
		{wire.FrameStdout, []byte("hello")},
		{wire.FrameType(0x7f), []byte("from a later version")},
		{wire.FrameStdout, big},
		{wire.FrameEOF, []byte{byte(wire.StreamStdout)}},
		{wire.FrameExit, wire.Exit{Signal: 9, CoreDumped: true}.Payload()},
		{wire.FrameReason, wire.ReasonPayload("killed", "ended by the operator")},
	} {
		if err := w.Write(f.t, f.p); err != nil {
			t.Fatal(err)
		}
	}
	r := wire.NewFrameReader(&b)
	var out []byte
	var types []wire.FrameType
	for {
		ft, p, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		types = append(types, ft)
		switch ft {
		case wire.FrameStdout:
			out = append(out, p...)
		case wire.FrameExit:
			e, err := wire.ParseExit(p)
			if err != nil || e.Signal != 9 || e.Code != 137 || !e.CoreDumped {
				t.Errorf("exit %+v, %v", e, err)
			}
		case wire.FrameReason:
			if r, m := wire.ParseReason(p); r != "killed" || m != "ended by the operator" {
				t.Errorf("reason %q %q", r, m)
			}
		}
	}
	if !bytes.Equal(out, append([]byte("hello"), big...)) {
		t.Errorf("stdout: %d bytes, want %d", len(out), 5+len(big))
	}
	want := []wire.FrameType{wire.FrameStdout, 0x7f, wire.FrameStdout, wire.FrameStdout, wire.FrameEOF, wire.FrameExit, wire.FrameReason}
	if len(types) != len(want) {
		t.Fatalf("types %v, want %v", types, want)
	}
	for i := range want {
		if types[i] != want[i] {
			t.Fatalf("types %v, want %v", types, want)
		}
	}
}

func TestFrameBounds(t *testing.T) {
	long := wire.AppendFrame(nil, wire.FrameStdin, nil)
	long[1], long[2], long[3], long[4] = 0, 1, 0, 1 // 65537 bytes
	if _, _, err := wire.NewFrameReader(bytes.NewReader(long)).Next(); !errors.Is(err, wire.ErrFrameTooLong) {
		t.Errorf("a frame over MaxPayload: %v", err)
	}
	cut := wire.AppendFrame(nil, wire.FrameStdin, []byte("abcdef"))[:8]
	if _, _, err := wire.NewFrameReader(bytes.NewReader(cut)).Next(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("a frame cut short: %v", err)
	}
	for _, p := range [][]byte{nil, {1, 0, 0, 0, 0, 0}, {1, 0, 0, 0, 200, 0}, {9, 0, 0, 0, 1, 0}} {
		if _, err := wire.ParseExit(p); err == nil {
			t.Errorf("exit payload %v accepted", p)
		}
	}
	if _, _, err := wire.ParseResize([]byte{1}); err == nil {
		t.Error("a short resize accepted")
	}
	if err := wire.ParsePing(make([]byte, 9)); err == nil {
		t.Error("a long ping accepted")
	}
}

// FuzzFrameReader: any bytes are frames or an error, never a panic or a
// payload over the bound, and every typed payload parses or errs.
func FuzzFrameReader(f *testing.F) {
	f.Add(wire.AppendFrame(nil, wire.FrameStdin, []byte("ls\n")))
	f.Add(wire.AppendFrame(wire.AppendFrame(nil, wire.FrameResize, wire.Resize(120, 30)), wire.FrameExit, wire.Exit{Code: 3}.Payload()))
	f.Add([]byte{0x09, 0, 0, 0, 3, 'a', 0, 'b', 0x0a, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r := wire.NewFrameReader(bytes.NewReader(b))
		for range 1000 {
			ft, p, err := r.Next()
			if err != nil {
				return
			}
			if len(p) > wire.MaxPayload {
				t.Fatalf("payload of %d bytes", len(p))
			}
			switch ft {
			case wire.FrameResize:
				_, _, _ = wire.ParseResize(p)
			case wire.FrameExit:
				if e, err := wire.ParseExit(p); err == nil && (e.Code < 0 || e.Signal < 0 || e.Signal > 127) {
					t.Fatalf("exit %+v", e)
				}
			case wire.FrameReason:
				_, _ = wire.ParseReason(p)
			case wire.FramePing:
				_ = wire.ParsePing(p)
			}
		}
	})
}
