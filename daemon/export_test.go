package daemon

import "time"

// SetWakeHold sets how long a request being read holds the spare it
// woke, for a test that watches the spare go and come back.
func (m *Manager) SetWakeHold(d time.Duration) {
	m.mu.Lock()
	m.wakeHold = d
	m.mu.Unlock()
}
