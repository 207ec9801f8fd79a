package daemon

import (
	"log/slog"
	"strings"
	"testing"
	"testing/slogtest"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
)

// The journald handler is a conforming slog.Handler (groups, WithAttrs
// before and after WithGroup, empty attributes and groups, LogValuers):
// run with names kept as paths, so that the entries read back as the
// nested maps slogtest wants; journald's UPPER_SNAKE is fieldName's.
func TestJournalHandlerConforms(t *testing.T) {
	var results []map[string]any
	send := func(msg string, pri journal.Priority, fields map[string]string) error {
		m := map[string]any{slog.MessageKey: msg, slog.LevelKey: pri}
		for k, v := range fields {
			if k == "SYSLOG_IDENTIFIER" {
				continue
			}
			path := strings.Split(k, ".")
			at := m
			for _, g := range path[:len(path)-1] {
				sub, ok := at[g].(map[string]any)
				if !ok {
					sub = map[string]any{}
					at[g] = sub
				}
				at = sub
			}
			if k == slog.TimeKey {
				tm, err := time.Parse(time.RFC3339Nano, v)
				if err != nil {
					t.Errorf("time %q: %v", v, err)
				}
				at[k] = tm
				continue
			}
			at[path[len(path)-1]] = v
		}
		results = append(results, m)
		return nil
	}
	h := NewJournalHandler(send, slog.LevelDebug)
	h.name = func(path []string) string { return strings.Join(path, ".") }
	if err := slogtest.TestHandler(h, func() []map[string]any { return results }); err != nil {
		t.Fatal(err)
	}
}
