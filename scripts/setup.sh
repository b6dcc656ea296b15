#!/usr/bin/env bash
# One idempotent set-up for a fresh Debian 12 machine, run as root by `make run` and `make test`:
# Debian packages, a virtualenv on Debian's python3 (which carries libseccomp's Python bindings),
# and an editable install of cocon. A second run with nothing to do takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: cocon manages namespaces, cgroups and mounts and must be set up as root (try: sudo make $*)" >&2
    exit 1
fi

# Everything cocon and its tests use from Debian, one package per line in scripts/apt-packages.txt.
mapfile -t packages < <(grep -vE '^\s*(#|$)' scripts/apt-packages.txt)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtualenv uses Debian's interpreter so that python3-seccomp (libseccomp's own bindings) is
# importable; everything else comes from PyPI, pinned by pyproject.toml.
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating virtualenv $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$venv/.cocon-installed" 2>/dev/null)" != "$stamp" ]; then
    echo "setup: installing cocon and its Python dependencies into $venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e '.[dev]'
    echo "$stamp" > "$venv/.cocon-installed"
fi

# cocon-runtime is started once per container, so its launcher skips `site` (python -S): that saves
# about a third of the interpreter's start-up. It needs nothing from site-packages but cocon itself
# and, when a seccomp profile is first compiled, libseccomp's bindings from Debian's dist-packages.
launcher="$venv/bin/cocon-runtime"
if ! grep -q 'launcher v2' "$launcher" 2>/dev/null; then
    cat > "$launcher" <<LAUNCHER
#!$PWD/$venv/bin/python -S
# Written by scripts/setup.sh (see there why -S); launcher v2.
import sys
sys.dont_write_bytecode = False  # a module edited since set-up is compiled once, not on every call
sys.path.insert(0, "$PWD/src")
sys.path.append("/usr/lib/python3/dist-packages")
from cocon.runtime.cli import entry
entry()
LAUNCHER
    chmod 755 "$launcher"
fi
# `cocon` too: `cocon run` is a container start, measured against podman (bench/run_vs_podman.py). Its
# launcher puts the virtualenv's site-packages on the path without running `site` (rich, zstandard are
# only imported by the commands and code paths that need them).
launcher="$venv/bin/cocon"
if ! grep -q 'launcher v2' "$launcher" 2>/dev/null; then
    purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    cat > "$launcher" <<LAUNCHER
#!$PWD/$venv/bin/python -S
# Written by scripts/setup.sh (see there why -S); launcher v2.
import sys
sys.dont_write_bytecode = False  # a module edited since set-up is compiled once, not on every call
sys.path.insert(0, "$PWD/src")
sys.path.append("$purelib")
sys.path.append("/usr/lib/python3/dist-packages")
from cocon.cli.main import entry
entry()
LAUNCHER
    chmod 755 "$launcher"
fi
# Offline Debian packages for the tests' debian:bookworm image.
scripts/debian-tarball.sh
scripts/debian-vm-tarball.sh

# Byte-compile cocon so that no command pays for compiling it (PYTHONDONTWRITEBYTECODE may be set;
# the launchers above write fresh bytecode anyway for modules edited later).
"$venv/bin/python" -m compileall -q src >/dev/null
