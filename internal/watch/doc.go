// Package watch calls a check function when files in a set of directories
// may have changed: after filesystem notifications (debounced, so a burst
// of writes or a Kubernetes ..data symlink swap is one check), and on a
// poll interval as a fallback where notifications are unavailable or lost.
// The check decides itself whether anything really changed; it runs on
// the watcher's goroutine and must not hold locks that a data path or a
// health check needs while it reads files.
package watch
