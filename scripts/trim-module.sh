#!/usr/bin/env bash
# trim-module.sh TOOLDIR MODULE OUT "FILE: NAME..."...
#
# Prepares a build of a test tool (SPIRE, step-ca) without the plugins the
# tests never configure. These tools compile every cloud provider's plugin
# into their binaries: SPIRE is 2,342 packages with them and 1,076 with only
# what the tests configure, step-ca 985 and 703.
#
# It copies MODULE (as required by TOOLDIR's go.mod) to OUT/src, and in each
# FILE (relative to the module) deletes, for each NAME, the plugin's import
# line ("…/NAME", `_ "…/NAME"` or `NAME "…"`) and its entry in a list of
# built-ins ("NAME.BuiltIn(),"). It then writes OUT/go.mod (TOOLDIR's, plus
# `replace MODULE => OUT/src`) and OUT/go.sum for `go build -modfile
# OUT/go.mod` in TOOLDIR. Everything kept is the released code; only those
# lines differ (go build -overlay cannot replace files of the module cache,
# hence the copy). A release that renames a plugin or its lines makes this
# fail loudly rather than the build silently differ.
set -euo pipefail
if [ "$#" -lt 4 ]; then
	echo "usage: $0 TOOLDIR MODULE OUT \"FILE: NAME...\"..." >&2
	exit 2
fi
tooldir=$1 module=$2 out=$3
shift 3
GO="${GO:-go}"
src=$(cd "$tooldir" && "$GO" mod download -json "$module" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [ -z "$src" ] || [ ! -f "$src/go.mod" ]; then
	echo "trim-module.sh: $module's module directory not found (go mod download gave ${src:-nothing})" >&2
	exit 1
fi

rm -rf "$out"
mkdir -p "$out"
out=$(cd "$out" && pwd)
cp -R "$src" "$out/src"
chmod -R u+w "$out/src"
for spec in "$@"; do
	file=$out/src/${spec%%:*}
	if [ ! -f "$file" ]; then
		echo "trim-module.sh: $module has no ${spec%%:*}" >&2
		exit 1
	fi
	for name in ${spec#*:}; do
		if ! grep -Eq "^[[:space:]]*((_ )?\"[^\"]*/$name\"|$name \"[^\"]*\")\$" "$file"; then
			echo "trim-module.sh: ${spec%%:*} does not import $name" >&2
			exit 1
		fi
		sed -i -E -e "/^[[:space:]]*$name\.BuiltIn\(\),\$/d" \
			-e "/^[[:space:]]*(_ )?\"[^\"]*\/$name\"\$/d" \
			-e "/^[[:space:]]*$name \"[^\"]*\"\$/d" "$file"
		if grep -qw "$name" "$file"; then
			echo "trim-module.sh: ${spec%%:*} still names $name after removing it" >&2
			exit 1
		fi
	done
done
cp "$tooldir/go.sum" "$out/go.sum"
{
	cat "$tooldir/go.mod"
	printf '\n// Written by scripts/trim-module.sh.\nreplace %s => %s/src\n' "$module" "$out"
} >"$out/go.mod"
