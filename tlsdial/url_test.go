package tlsdial

import (
	"strings"
	"testing"

	"github.com/attach-agent/attach-agent/wire"
)

// #v2 selects protocol v2 and is no part of the secret; no fragment (or
// an empty one, as a URL library drops it) is the Heroku wire.
func TestParseV2(t *testing.T) {
	for in, v2 := range map[string]bool{
		"rendezvous://h:1/abc#v2": true, "rendezvous://h:1/abc": false, "rendezvous://h:1/abc#": false,
		"rendezvous://h:1/abc?x=1#v2": true,
	} {
		u, err := Parse(in)
		if err != nil || u.V2 != v2 || strings.Contains(u.Secret, "#") || !strings.HasPrefix(u.Secret, "abc") {
			t.Errorf("Parse(%q) = %+v, %v; want V2 %v and no fragment in the secret", in, u, err, v2)
		}
		if v2 && !strings.HasSuffix(u.String(), "#v2") {
			t.Errorf("String() = %q: want the #v2", u.String())
		}
	}
}

func TestParse(t *testing.T) {
	long := strings.Repeat("a", wire.MaxSecretLen+1)
	tests := []struct {
		in      string
		host    string
		port    int
		secret  string
		wantErr string
	}{
		{in: "rendezvous://rendezvous.runtime.heroku.com:5000/abc123", host: "rendezvous.runtime.heroku.com", port: 5000, secret: "abc123"},
		{in: "rendezvous://127.0.0.1:443/s", host: "127.0.0.1", port: 443, secret: "s"},
		{in: "rendezvous://[::1]:5001/s", host: "::1", port: 5001, secret: "s"},
		{in: "rendezvous://[::1]/s", host: "::1", port: 5000, secret: "s"},
		{in: "rendezvous://example.com/s", host: "example.com", port: 5000, secret: "s"},
		{in: "RENDEZVOUS://example.com/s", host: "example.com", port: 5000, secret: "s"},
		{in: "rendezvous://h:1/a%20b?x=1&y=%2F", host: "h", port: 1, secret: "a%20b?x=1&y=%2F"},
		{in: "rendezvous://h:1/a/b/c", host: "h", port: 1, secret: "a/b/c"},
		{in: "rendezvous://h:65535/" + strings.Repeat("z", wire.MaxSecretLen), host: "h", port: 65535, secret: strings.Repeat("z", wire.MaxSecretLen)},

		{in: "https://h:1/s", wantErr: `scheme "https" is not supported: want rendezvous://`},
		{in: "h:1/s", wantErr: `missing "://"`},
		{in: "rendezvous://h:1/", wantErr: "empty secret"},
		{in: "rendezvous://h:1", wantErr: "empty secret"},
		{in: "rendezvous:///s", wantErr: "empty host"},
		{in: "rendezvous://:5000/s", wantErr: "empty host"},
		{in: "rendezvous://h:/s", wantErr: "empty port"},
		{in: "rendezvous://h:0/s", wantErr: `bad port "0"`},
		{in: "rendezvous://h:65536/s", wantErr: `bad port "65536"`},
		{in: "rendezvous://h:+80/s", wantErr: `bad port "+80"`},
		{in: "rendezvous://h:http/s", wantErr: `bad port "http"`},
		{in: "rendezvous://::1:5000/s", wantErr: "IPv6 literals need brackets"},
		{in: "rendezvous://[::1/s", wantErr: "missing ']'"},
		{in: "rendezvous://[::1]x/s", wantErr: "unexpected"},
		{in: "rendezvous://[1.2.3.4]:1/s", wantErr: "not an IPv6 address"},
		{in: "rendezvous://u@h:1/s", wantErr: "user info"},
		{in: "rendezvous://h:1/" + long, wantErr: "over the 1024-byte limit"},
		{in: "rendezvous://h:1/a b", wantErr: "whitespace or control byte (0x20) at offset 1"},
		{in: "rendezvous://h:1/a\tb", wantErr: "(0x09)"},
		{in: "rendezvous://h:1/ab\r\n", wantErr: "(0x0d)"},
		{in: "rendezvous://h:1/a\x00", wantErr: "(0x00)"},
		{in: "rendezvous://h:1/a#frag", wantErr: "fragment #frag is not known: #v2 selects protocol v2"},
		{in: "rendezvous://h:1/a#v2#v2", wantErr: "fragment #v2#v2 is not known"},
	}
	for _, tt := range tests {
		u, err := Parse(tt.in)
		if tt.wantErr != "" {
			if err == nil {
				t.Errorf("Parse(%q) = %+v, want error containing %q", tt.in, u, tt.wantErr)
				continue
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Parse(%q) error = %q, want it to contain %q", tt.in, err, tt.wantErr)
			}
			if strings.Contains(tt.in, "/s") && strings.Contains(err.Error(), "/s") {
				t.Errorf("Parse(%q) error %q shows the secret", tt.in, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Parse(%q): %v", tt.in, err)
			continue
		}
		if u.Host != tt.host || u.Port != tt.port || u.Secret != tt.secret {
			t.Errorf("Parse(%q) = %q %d %q, want %q %d %q", tt.in, u.Host, u.Port, u.Secret, tt.host, tt.port, tt.secret)
		}
	}
}

func TestURLStringHidesSecret(t *testing.T) {
	u, err := Parse("rendezvous://[::1]:5000/supersecret")
	if err != nil {
		t.Fatal(err)
	}
	s := u.String()
	if strings.Contains(s, "supersecret") {
		t.Fatalf("String() = %q shows the secret", s)
	}
	if want := "rendezvous://[::1]:5000/{fp:" + wire.Fingerprint("supersecret") + "}"; s != want {
		t.Fatalf("String() = %q, want %q", s, want)
	}
	if len(u.Fingerprint()) != 12 || u.Fingerprint() == wire.Fingerprint("other") {
		t.Fatalf("fingerprint %q is not a 12-digit tag that tells secrets apart", u.Fingerprint())
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"rendezvous://h:5000/s", "rendezvous://[::1]:1/s?q", "rendezvous://[", "rendezvous://:/",
		"rendezvous://h:99999999999999999999/s", "x://", "rendezvous://[::ffff:1.2.3.4]/s",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := Parse(s)
		if err != nil {
			return
		}
		if u.Secret == "" || len(u.Secret) > wire.MaxSecretLen || u.Host == "" || u.Port < 1 || u.Port > 65535 {
			t.Fatalf("Parse(%q) accepted %+v", s, u)
		}
		// What parses must parse again to the same thing from its parts.
		again, err := Parse(Scheme + "://" + u.Addr() + "/" + u.Secret)
		if err != nil || again != u {
			t.Fatalf("round trip of %q: %+v, %v", s, again, err)
		}
	})
}
