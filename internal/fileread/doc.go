// Package fileread reads the files meshproxy takes from operators and
// mounts (certificates, keys, bundles, tokens, policies, the CA directory)
// with bounds: regular files only (after following symlinks), a size cap
// per kind of file, and a deadline, so a FIFO, a device or a huge file at a
// configured path is refused with a reason instead of blocking a reload or
// filling memory.
package fileread
