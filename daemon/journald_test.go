package daemon_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/journal"

	"github.com/attach-agent/attach-agent/daemon"
	"github.com/attach-agent/attach-agent/internal/relaytest"
	"github.com/attach-agent/attach-agent/tlsdial"
)

type entry struct {
	msg    string
	pri    journal.Priority
	fields map[string]string
}

func TestJournaldFields(t *testing.T) {
	var mu sync.Mutex
	var entries []entry
	send := func(msg string, pri journal.Priority, fields map[string]string) error {
		mu.Lock()
		defer mu.Unlock()
		entries = append(entries, entry{msg, pri, fields})
		return nil
	}
	env := relaytest.Start(t, nil)
	// A supervisor logging to the fake journal.
	mgr, err := daemon.NewManager(testConfig(t, env), slog.New(daemon.NewJournalHandler(send, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer mgr.Drain(context.Background(), 0)
	secret := "journal-secret"
	u := env.URL(secret)
	v, err := mgr.Create(daemon.Request{AttachURL: "rendezvous://" + u.Addr() + "/" + secret,
		Command: []byte(`["sh", "-c", "echo out; exit 3"]`), Labels: map[string]string{"app": "shop"}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := tlsdial.Dial(t.Context(), u, env.Dial)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Pair(t.Context(), secret, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(c)
	_ = c.Close()
	mgr.Wait(t.Context(), v.ID)
	mu.Lock()
	defer mu.Unlock()
	var end *entry
	for i := range entries {
		for k, val := range entries[i].fields {
			if val == secret || k == secret {
				t.Fatalf("secret in journal entry %+v", entries[i])
			}
		}
		if entries[i].msg == "session ended" {
			end = &entries[i]
		}
	}
	if end == nil {
		t.Fatalf("no session end entry in %+v", entries)
	}
	want := map[string]string{"SESSION_ID": v.ID, "REASON": "exited", "EXIT_CODE": "3", "BYTES_OUT": "5", // "out\r\n" through the pty
		"BYTES_IN": "0", "SECRET_FP": u.Fingerprint(), "LABEL_APP": "shop"}
	for k, val := range want {
		if end.fields[k] != val {
			t.Errorf("field %s = %q, want %q (entry %+v)", k, end.fields[k], val, end.fields)
		}
	}
	if _, ok := end.fields["DURATION_MS"]; !ok || end.pri != journal.PriInfo {
		t.Errorf("entry %+v: want DURATION_MS and priority info", end)
	}
}
