package authn

import (
	"os"
	"syscall"
	"time"
)

// fileStamp identifies one version of a file: a change of content (mtime,
// size) or a replaced file (inode, e.g. Kubernetes' ..data symlink swap).
type fileStamp struct {
	mod   time.Time
	size  int64
	inode uint64
}

func statFile(path string) (fileStamp, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{}, err
	}
	st := fileStamp{mod: fi.ModTime(), size: fi.Size()}
	if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
		st.inode = sys.Ino
	}
	return st, nil
}
