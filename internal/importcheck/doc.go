// Package importcheck holds the test that keeps the package boundaries of
// DESIGN.md true: ptyio and tlsdial know nothing of HTTP, Prometheus or
// journald, and agent (one session) nothing of those or of the daemon (k8s keeps such rules in .import-restrictions; here they are a
// test). It has no code of its own.
package importcheck
