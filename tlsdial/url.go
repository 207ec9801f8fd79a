// Package tlsdial turns an attach URL into a paired byte stream: it parses
// rendezvous://HOST:PORT/SECRET, dials the relay over TLS with bounded,
// retried attempts, sends the secret and reads exactly through the relay's
// acknowledgement, and reports how long each phase took.
//
// It knows nothing of ptys, HTTP, metrics or logs: callers get timings and
// typed errors and decide what to record.
package tlsdial

import (
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/attach-agent/attach-agent/wire"
)

// Scheme is the only URL scheme an attach URL may have.
const Scheme = "rendezvous"

// DefaultPort is used when an attach URL names no port (Heroku's relay port).
const DefaultPort = 5000

// URL is a parsed attach URL. Its String method never shows the secret.
type URL struct {
	Host   string // host name or IP literal, without brackets
	Port   int    // 1..65535
	Secret string // sent verbatim as the first line; never log it
	// V2 selects protocol v2 (framed: stdout and stderr apart, end of
	// input, window size, keepalive, exit status and end reason in band):
	// the URL's fragment #v2, which is never sent on the wire, so both
	// ends agree on it out of band and the relay sees nothing new.
	V2 bool
}

// Addr is the relay's dial address (IPv6 literals bracketed).
func (u URL) Addr() string { return net.JoinHostPort(u.Host, strconv.Itoa(u.Port)) }

// Fingerprint is a short, stable, one-way tag for the secret, fit for logs.
func (u URL) Fingerprint() string { return wire.Fingerprint(u.Secret) }

// String shows the URL with the secret replaced by its fingerprint.
func (u URL) String() string {
	s := Scheme + "://" + u.Addr() + "/{fp:" + u.Fingerprint() + "}"
	if u.V2 {
		s += "#" + FragmentV2
	}
	return s
}

// FragmentV2 is the attach URL's fragment that selects protocol v2.
const FragmentV2 = "v2"

// Parse parses rendezvous://HOST[:PORT]/SECRET[#v2]. The secret is the
// path without its leading "/" plus the query string, kept verbatim
// (percent escapes are not decoded), exactly as the Heroku CLI sends it.
// The fragment, never sent, selects protocol v2; no other is known.
//
// Errors never contain the secret itself.
func Parse(raw string) (URL, error) {
	var u URL
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return u, fmt.Errorf("attach url: missing %q: want %s://HOST:PORT/SECRET", "://", Scheme)
	}
	if !strings.EqualFold(scheme, Scheme) {
		return u, fmt.Errorf("attach url: scheme %q is not supported: want %s://HOST:PORT/SECRET", clip(scheme), Scheme)
	}
	rest, frag, hasFrag := strings.Cut(rest, "#")
	v2 := false
	switch {
	case !hasFrag || frag == "":
	case frag == FragmentV2:
		v2 = true
	default:
		return u, fmt.Errorf("attach url: fragment #%s is not known: #%s selects protocol v2, no fragment the Heroku wire", clip(frag), FragmentV2)
	}
	authority, secret, ok := strings.Cut(rest, "/")
	if !ok || secret == "" {
		return u, fmt.Errorf("attach url: empty secret: want %s://HOST:PORT/SECRET", Scheme)
	}
	if strings.Contains(authority, "@") {
		return u, fmt.Errorf("attach url: user info before the host is not supported: want %s://HOST:PORT/SECRET", Scheme)
	}
	host, port, err := splitHostPort(authority)
	if err != nil {
		return u, fmt.Errorf("attach url: %w", err)
	}
	if err := checkSecret(secret); err != nil {
		return u, fmt.Errorf("attach url: %w", err)
	}
	return URL{Host: host, Port: port, Secret: secret, V2: v2}, nil
}

func splitHostPort(authority string) (string, int, error) {
	if authority == "" {
		return "", 0, fmt.Errorf("empty host: want %s://HOST:PORT/SECRET", Scheme)
	}
	host, portStr := authority, ""
	if strings.HasPrefix(authority, "[") {
		end := strings.IndexByte(authority, ']')
		if end < 0 {
			return "", 0, fmt.Errorf("host %q: missing ']' after IPv6 literal", clip(authority))
		}
		host = authority[1:end]
		after := authority[end+1:]
		if after != "" {
			if !strings.HasPrefix(after, ":") {
				return "", 0, fmt.Errorf("host %q: unexpected %q after IPv6 literal", clip(authority), clip(after))
			}
			portStr = after[1:]
			if portStr == "" {
				return "", 0, fmt.Errorf("empty port after ':': give a port from 1 to 65535 or leave out the ':'")
			}
		}
		if ip := net.ParseIP(host); ip == nil || ip.To4() != nil {
			return "", 0, fmt.Errorf("host %q: not an IPv6 address", clip(host))
		}
	} else {
		if i := strings.LastIndexByte(authority, ':'); i >= 0 {
			host, portStr = authority[:i], authority[i+1:]
			if strings.Contains(host, ":") {
				return "", 0, fmt.Errorf("host %q: IPv6 literals need brackets, as in [::1]:5000", clip(authority))
			}
			if portStr == "" {
				return "", 0, fmt.Errorf("empty port after ':': give a port from 1 to 65535 or leave out the ':'")
			}
		}
		if host == "" {
			return "", 0, fmt.Errorf("empty host: want %s://HOST:PORT/SECRET", Scheme)
		}
		for _, c := range host {
			if c <= ' ' || c == 0x7f || strings.ContainsRune("/?#[]%", c) {
				return "", 0, fmt.Errorf("host %q: invalid character %q", clip(host), c)
			}
		}
	}
	port := DefaultPort
	if portStr != "" {
		p, err := strconv.Atoi(portStr)
		if err != nil || p < 1 || p > 65535 || portStr[0] == '+' || portStr[0] == '-' {
			return "", 0, fmt.Errorf("bad port %q: want a number from 1 to 65535", clip(portStr))
		}
		port = p
	}
	return host, port, nil
}

func checkSecret(s string) error {
	if len(s) > wire.MaxSecretLen {
		return fmt.Errorf("secret is %d bytes, over the %d-byte limit", len(s), wire.MaxSecretLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c == 0x7f {
			return fmt.Errorf("secret has a whitespace or control byte (0x%02x) at offset %d: secrets are sent as one line", c, i)
		}
	}
	if strings.Contains(s, "#") {
		return fmt.Errorf("secret has a '#' (a URL fragment), which clients do not send: remove it")
	}
	return nil
}

// clip keeps user-supplied text in errors short (never the secret: callers
// only clip the scheme, host and port).
func clip(s string) string {
	const max = 64
	if len(s) > max {
		return s[:max] + "..."
	}
	return s
}
