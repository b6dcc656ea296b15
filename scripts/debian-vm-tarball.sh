#!/usr/bin/env bash
# The packages of a bootable Debian bookworm guest (systemd, Debian's generic kernel, initramfs-tools,
# systemd-networkd/resolved, cloud-init), downloaded once by the set-up (debootstrap --make-tarball) so
# that tests and benchmarks bootstrap cocon's test VM image from this file, offline
# (cocon.vmm.guest_images.bootstrap_debian_vm). The mirror is the one in this machine's apt configuration.
# The package list must stay the same as cocon.vmm.guest_images.VM_PACKAGES.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=.cache/debootstrap-bookworm-vm.tgz
packages=$(.venv/bin/python -c 'from cocon.vmm.guest_images import VM_PACKAGES; print(",".join(VM_PACKAGES))')
# The package list is kept beside the tarball: a changed list downloads again.
[ -s "$tarball" ] && [ "$(cat "$tarball.packages" 2>/dev/null)" = "$packages" ] && exit 0
mkdir -p .cache
mirror=$(.venv/bin/python -c 'from cocon.images.bootstrap import find_apt_mirror; print(find_apt_mirror("bookworm"))')
work=$(mktemp -d /tmp/cocon-debootstrap-vm.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "setup: downloading the packages of a bootable Debian bookworm guest for the VM tests (once)"
if ! debootstrap --variant=minbase --include="$packages" --make-tarball="$PWD/$tarball.part" \
        bookworm "$work/target" "$mirror" > "$work/log" 2>&1; then
    tail -20 "$work/log" >&2
    rm -f "$tarball.part"
    echo "setup: debootstrap --make-tarball failed (mirror $mirror)" >&2
    exit 1
fi
mv "$tarball.part" "$tarball"
echo "$packages" > "$tarball.packages"
