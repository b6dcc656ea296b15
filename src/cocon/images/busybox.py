"""A minimal root filesystem from the host's busybox-static: the base of cocon's `busybox` image."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class BusyboxMissing(Exception):
    """The host has no statically linked busybox."""


def is_static_elf(path: str) -> bool:
    """A 64-bit ELF executable without a PT_INTERP program header needs no shared libraries."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return False
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_static_busybox() -> str:
    for path in BUSYBOX_CANDIDATES:
        if os.path.isfile(path) and is_static_elf(path):
            return path
    raise BusyboxMissing("no static busybox on this host: install Debian's busybox-static")


def applets(busybox: str) -> list[str]:
    out = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def make_rootfs(dest: str, busybox: str | None = None) -> None:
    """Populate `dest` with busybox, a link per applet, and the usual top-level directories."""
    busybox = busybox or find_static_busybox()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp", "root", "home",
              "var", "run"):  # fmt: skip
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    shutil.copy2(busybox, os.path.join(dest, "bin/busybox"))
    for applet in applets(busybox):
        link = os.path.join(dest, applet.lstrip("/"))
        if applet.lstrip("/") == "bin/busybox" or os.path.lexists(link):
            continue
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink("/bin/busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": "busybox\n",
    }
    for name, text in files.items():
        with open(os.path.join(dest, name), "w") as f:
            f.write(text)
