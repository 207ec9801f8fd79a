package daemon

import (
	"context"
	"log/slog"
	"strings"
	"time"
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
	attrs  []groupedAttr // from WithAttrs, each with the groups open then
	groups []string      // from WithGroup
	// name joins a field's groups and key into its name: UPPER_SNAKE for
	// journald (fieldName of the parts joined by "_").
	name func(path []string) string
}

type groupedAttr struct {
	groups []string
	attr   slog.Attr
}

func journalName(path []string) string { return fieldName(strings.Join(path, "_")) }

// NewJournalHandler sends through send (nil: journal.Send) at level and above.
func NewJournalHandler(send JournalSender, level slog.Leveler) *JournalHandler {
	if send == nil {
		send = journal.Send
	}
	if level == nil {
		level = slog.LevelInfo
	}
	return &JournalHandler{send: send, level: level, name: journalName}
}

// Enabled implements slog.Handler.
func (h *JournalHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

// Handle implements slog.Handler.
func (h *JournalHandler) Handle(_ context.Context, r slog.Record) error {
	fields := make(map[string]string, len(h.attrs)+r.NumAttrs()+1)
	var add func(path []string, a slog.Attr)
	add = func(path []string, a slog.Attr) {
		a.Value = a.Value.Resolve()
		switch {
		case a.Equal(slog.Attr{}):
			return // the empty attribute: nothing
		case a.Value.Kind() == slog.KindGroup:
			if a.Key != "" { // an unnamed group's attributes are inlined
				path = append(path[:len(path):len(path)], a.Key)
			}
			for _, g := range a.Value.Group() {
				add(path, g)
			}
			return
		}
		fields[h.name(append(path[:len(path):len(path)], a.Key))] = a.Value.String()
	}
	for _, ga := range h.attrs {
		add(ga.groups, ga.attr)
	}
	if !r.Time.IsZero() {
		// The record's own time (journald stamps its arrival too).
		fields[h.name([]string{slog.TimeKey})] = r.Time.Format(time.RFC3339Nano)
	}
	r.Attrs(func(a slog.Attr) bool { add(h.groups, a); return true })
	if _, ok := fields["SYSLOG_IDENTIFIER"]; !ok {
		fields["SYSLOG_IDENTIFIER"] = SyslogIdentifier // journalctl -t attach-agent
	}
	return h.send(r.Message, priority(r.Level), fields)
}

// WithAttrs implements slog.Handler.
// Attributes added before a group keep their own (outer) groups.
func (h *JournalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append([]groupedAttr(nil), h.attrs...)
	for _, a := range as {
		c.attrs = append(c.attrs, groupedAttr{groups: h.groups, attr: a})
	}
	return &c
}

// WithGroup implements slog.Handler; an empty name is no group.
func (h *JournalHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.groups = append(h.groups[:len(h.groups):len(h.groups)], name)
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
