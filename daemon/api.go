package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// MaxRequestBody bounds a control API request body.
const MaxRequestBody = 1 << 20

// maxWait bounds ?wait= on GET /v1/sessions/{id}.
const maxWait = 10 * time.Minute

// maxGrace bounds a drain's grace.
const maxGrace = 24 * time.Hour

// NewAPI serves the control API (docs/API.md) over m to the callers a
// allows (see ConnContext); a drain with no grace given gets
// defaultGrace.
func NewAPI(m *Manager, a Access, defaultGrace time.Duration) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		// Woken before the body is read, so that it is awake by the time
		// the session is handed to it.
		m.wakeSpare()
		r.Body = http.MaxBytesReader(w, r.Body, MaxRequestBody)
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		var req Request
		if err := dec.Decode(&req); err != nil {
			var mbe *http.MaxBytesError
			if errors.As(err, &mbe) {
				apiError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", MaxRequestBody))
				return
			}
			apiError(w, http.StatusBadRequest, "bad JSON: "+strings.TrimPrefix(err.Error(), "json: "))
			return
		}
		if dec.More() {
			apiError(w, http.StatusBadRequest, "bad JSON: more than one object in the body")
			return
		}
		caller, _ := callerOf(r.Context())
		v, err := m.create(req, caller, a)
		var re *RequestError
		var pe *PolicyError
		switch {
		case errors.As(err, &re):
			apiError(w, http.StatusBadRequest, re.Error())
		case errors.As(err, &pe):
			apiError(w, http.StatusForbidden, pe.Error())
		case errors.Is(err, ErrDuplicate):
			apiError(w, http.StatusConflict, err.Error())
		case errors.Is(err, ErrFull):
			apiError(w, http.StatusTooManyRequests, err.Error())
		case errors.Is(err, ErrShuttingDown):
			apiError(w, http.StatusServiceUnavailable, err.Error())
		case err != nil:
			apiError(w, http.StatusInternalServerError, err.Error())
		default:
			w.Header().Set("Location", "/v1/sessions/"+v.ID)
			writeJSON(w, http.StatusCreated, v)
		}
	})
	mux.HandleFunc("GET /v1/sessions", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"sessions": m.List()})
	})
	mux.HandleFunc("GET /v1/sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		var v View
		var ok bool
		if ws := r.URL.Query().Get("wait"); ws != "" {
			d, err := time.ParseDuration(ws)
			if err != nil || d < 0 || d > maxWait {
				apiError(w, http.StatusBadRequest, fmt.Sprintf("wait: %q is not a duration from 0 to %v", ws, maxWait))
				return
			}
			ctx, cancel := context.WithTimeout(r.Context(), d)
			v, ok = m.Wait(ctx, id)
			cancel()
		} else {
			v, ok = m.Get(id)
		}
		if !ok {
			apiError(w, http.StatusNotFound, "no session "+id)
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
	mux.HandleFunc("DELETE /v1/sessions/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if !m.Kill(id) {
			apiError(w, http.StatusNotFound, "no session "+id)
			return
		}
		v, _ := m.Get(id)
		writeJSON(w, http.StatusAccepted, v)
	})
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		r.Body = http.MaxBytesReader(w, r.Body, MaxRequestBody)
		var req struct {
			Grace string `json:"grace"`
		}
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil && !errors.Is(err, io.EOF) {
			apiError(w, http.StatusBadRequest, "bad JSON: want {\"grace\": \"30s\"} or no body: "+strings.TrimPrefix(err.Error(), "json: "))
			return
		}
		grace := defaultGrace
		if req.Grace != "" {
			d, err := time.ParseDuration(req.Grace)
			if err != nil || d < 0 || d > maxGrace {
				apiError(w, http.StatusBadRequest, fmt.Sprintf("grace: %q is not a duration from 0 to %v", req.Grace, maxGrace))
				return
			}
			grace = d
		}
		// The drain outlives this request if its caller goes: ending every
		// session is not undone by a closed connection.
		views := m.Drain(context.WithoutCancel(r.Context()), grace)
		shut := 0
		for _, v := range views {
			if v.Reason == "shutdown" {
				shut++
			}
		}
		writeJSON(w, http.StatusOK, map[string]any{"sessions": views, "ended": len(views), "ended_by_drain": shut})
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if m.Closing() {
			apiError(w, http.StatusServiceUnavailable, ErrShuttingDown.Error())
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "active": m.Active()})
	})
	return guard(mux, a)
}

// guard lets through only the callers a allows, and names the refused one.
func guard(h http.Handler, a Access) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := callerOf(r.Context())
		switch {
		case !ok:
			apiError(w, http.StatusForbidden, errNoCaller.Error())
		case !a.allows(c):
			apiError(w, http.StatusForbidden, fmt.Sprintf("uid %d (gid %d) may not use the control API: the daemon's --allow-uid or --allow-gid admits callers", c.UID, c.GID))
		default:
			h.ServeHTTP(w, r)
		}
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // best effort: the client may be gone
}

func apiError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, map[string]string{"error": msg})
}
