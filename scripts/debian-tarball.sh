#!/usr/bin/env bash
# The packages of a minbase Debian bookworm, downloaded once by the set-up (debootstrap --make-tarball)
# so that tests bootstrap debian:bookworm from this file, offline (cocon image bootstrap --tarball).
# The mirror is the one in this machine's apt configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=.cache/debootstrap-bookworm-minbase.tgz
[ -s "$tarball" ] && exit 0
mkdir -p .cache
mirror=$(.venv/bin/python -c 'from cocon.images.bootstrap import find_apt_mirror; print(find_apt_mirror("bookworm"))')
work=$(mktemp -d /tmp/cocon-debootstrap.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "setup: downloading the packages of a minbase Debian bookworm for the tests (once)"
if ! debootstrap --variant=minbase --make-tarball="$PWD/$tarball.part" bookworm "$work/target" "$mirror" \
        > "$work/log" 2>&1; then
    tail -20 "$work/log" >&2
    rm -f "$tarball.part"
    echo "setup: debootstrap --make-tarball failed (mirror $mirror)" >&2
    exit 1
fi
mv "$tarball.part" "$tarball"
