// Package importcheck holds the test that keeps the package boundaries of
// DESIGN.md true: ptyio and tlsdial know nothing of HTTP, Prometheus or
// journald (k8s keeps such rules in .import-restrictions; here they are a
// test). It has no code of its own.
package importcheck
