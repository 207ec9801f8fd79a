package rendezvous_test

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/attach-agent/attach-agent/rendezvous"
	"github.com/attach-agent/attach-agent/tlsdial"
	"github.com/attach-agent/attach-agent/wire"
)

func TestStatusFilterAnySplit(t *testing.T) {
	marker := wire.ExitStatusLine(42)
	cases := []struct{ in, out string }{
		{"hello\n" + marker, "hello\n"},
		{"a" + marker + "b", "ab"},
		{"x\uFFFF heroku-command-exit-status: 7\r\ny", "xy"},
		{"\uFFFF heroku-command-exit-status: nope\n", "\uFFFF heroku-command-exit-status: nope\n"},
		{"\uFFFF heroku-command-exit\n", "\uFFFF heroku-command-exit\n"},
		{"\xef\xbf", "\xef\xbf"},
		{"end \uFFFF heroku-command-exit-status: 9", "end "},
	}
	for _, c := range cases {
		for cut := 0; cut <= len(c.in); cut++ {
			for cut2 := cut; cut2 <= len(c.in); cut2 += max(1, len(c.in)/7) {
				var out bytes.Buffer
				f := &wire.StatusFilter{W: &out}
				for _, part := range []string{c.in[:cut], c.in[cut:cut2], c.in[cut2:]} {
					if _, err := f.Write([]byte(part)); err != nil {
						t.Fatal(err)
					}
				}
				if err := f.Flush(); err != nil {
					t.Fatal(err)
				}
				if out.String() != c.out {
					t.Fatalf("%q cut at %d,%d: out %q, want %q", c.in, cut, cut2, out.String(), c.out)
				}
				wantFound := c.in != c.out
				if f.Found != wantFound {
					t.Fatalf("%q cut at %d,%d: Found = %v", c.in, cut, cut2, f.Found)
				}
			}
		}
	}
}

func TestClientExitStatusAndEOFByte(t *testing.T) {
	for _, eofByte := range []bool{false, true} {
		e := start(t, &rendezvous.Relay{})
		dynoDone := make(chan error, 1)
		go func() {
			dynoDone <- func() error {
				c, err := tlsdial.Dial(context.Background(), e.url, e.dial)
				if err != nil {
					return err
				}
				defer c.Close()
				if err := c.Pair(context.Background(), e.url.Secret, 10*time.Second); err != nil {
					return err
				}
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				// Read the client's input to its end, echo it, then report.
				var in []byte
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					in = append(in, buf[:n]...)
					if err == io.EOF || (eofByte && bytes.HasSuffix(in, []byte{rendezvous.EOFByte})) {
						break
					}
					if err != nil {
						return err
					}
				}
				if _, err := c.Write(append([]byte("got:"), in...)); err != nil {
					return err
				}
				if _, err := io.WriteString(c, wire.ExitStatusLine(3)); err != nil {
					return err
				}
				return c.CloseWrite()
			}()
		}()
		var out bytes.Buffer
		cl := &rendezvous.Client{URL: e.url, Dial: e.dial, EOFByte: eofByte, Stdin: strings.NewReader("input"), Stdout: &out}
		res, err := cl.Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := <-dynoDone; err != nil {
			t.Fatal(err)
		}
		want := "got:input"
		if eofByte {
			want += "\x04"
		}
		if out.String() != want || !res.Found || res.Status != 3 {
			t.Errorf("eofByte=%v: out %q, result %+v; want %q and status 3", eofByte, out.String(), res, want)
		}
	}
}
