// Package rootrotation tests a zero-downtime root rotation with real
// processes: a meshproxy CA and two sidecars carry constant traffic (new
// connections and kept ones) while `meshproxy ca rotate-root` moves through
// add, switch and retire; no connection may fail, and afterwards both
// sidecars hold certificates chaining to the new root only.
package rootrotation
