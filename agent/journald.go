package agent

import (
	"context"
	"log/slog"
	"strings"
	"unicode"

	"github.com/coreos/go-systemd/v22/journal"
)

// SyslogIdentifier tags every journal entry, for `journalctl -t`.
const SyslogIdentifier = "attach-agent"

// JournalSender sends one journal entry (journal.Send's shape), so tests
// can inject a fake.
type JournalSender func(message string, priority journal.Priority, fields map[string]string) error

// JournalHandler is a slog.Handler that writes structured journald entries:
// each attribute becomes a field in UPPER_SNAKE (session_id: SESSION_ID,
// label_app: LABEL_APP), the level becomes the priority.
type JournalHandler struct {
	send   JournalSender
	level  slog.Leveler
	attrs  []slog.Attr
	prefix string
}

// NewJournalHandler sends through send (nil: journal.Send) at level and above.
func NewJournalHandler(send JournalSender, level slog.Leveler) *JournalHandler {
	if send == nil {
		send = journal.Send
	}
	if level == nil {
		level = slog.LevelInfo
	}
	return &JournalHandler{send: send, level: level}
}

// Enabled implements slog.Handler.
func (h *JournalHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

// Handle implements slog.Handler.
func (h *JournalHandler) Handle(_ context.Context, r slog.Record) error {
	fields := make(map[string]string, len(h.attrs)+r.NumAttrs())
	add := func(prefix string, a slog.Attr) {}
	add = func(prefix string, a slog.Attr) {
		if a.Value.Kind() == slog.KindGroup {
			for _, g := range a.Value.Group() {
				add(prefix+a.Key+"_", g)
			}
			return
		}
		fields[fieldName(prefix+a.Key)] = a.Value.Resolve().String()
	}
	for _, a := range h.attrs {
		add(h.prefix, a)
	}
	r.Attrs(func(a slog.Attr) bool { add(h.prefix, a); return true })
	if _, ok := fields["SYSLOG_IDENTIFIER"]; !ok {
		fields["SYSLOG_IDENTIFIER"] = SyslogIdentifier // journalctl -t attach-agent
	}
	return h.send(r.Message, priority(r.Level), fields)
}

// WithAttrs implements slog.Handler.
func (h *JournalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr(nil), h.attrs...), as...)
	return &c
}

// WithGroup implements slog.Handler.
func (h *JournalHandler) WithGroup(name string) slog.Handler {
	c := *h
	c.prefix = h.prefix + name + "_"
	return &c
}

func priority(l slog.Level) journal.Priority {
	switch {
	case l >= slog.LevelError:
		return journal.PriErr
	case l >= slog.LevelWarn:
		return journal.PriWarning
	case l >= slog.LevelInfo:
		return journal.PriInfo
	}
	return journal.PriDebug
}

// fieldName makes a journald field name: upper case letters, digits and
// '_', not starting with '_' or a digit (journald rejects those).
func fieldName(k string) string {
	var b strings.Builder
	for _, r := range k {
		switch {
		case r >= 'a' && r <= 'z':
			b.WriteRune(unicode.ToUpper(r))
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	s := strings.TrimLeft(b.String(), "_")
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		s = "F_" + s
	}
	return s
}
