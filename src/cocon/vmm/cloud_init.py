"""NoCloud seed images for cloud-init: the small ISO 9660 disk a full VM finds its user data on.

cloud-init's NoCloud datasource looks for a filesystem labelled `CIDATA` (or `cidata`) holding
`user-data`, `meta-data` and, optionally, `network-config`. `make_seed` writes such an image (ISO 9660
with Joliet and Rock Ridge, volume id `CIDATA`, made with pycdlib) atomically: a temporary file in the
destination directory, renamed over the destination once complete, so a reader never sees half a seed.

User data is checked before it is written (`validate_user_data`): cloud-init silently ignores user data
whose first line it does not recognise, so a typo there would boot a VM that was never configured.
`network_config_static` and `network_config_dhcp` build netplan v2 documents for the `network-config` file.
"""

from __future__ import annotations

import email
import io
import ipaddress
import os
import re
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import pycdlib
import yaml  # type: ignore[import-untyped]

from cocon.vmm.errors import VmmError

__all__ = [
    "MAX_USER_DATA",
    "USER_DATA_KINDS",
    "VOLUME_ID",
    "CloudInitError",
    "make_seed",
    "network_config_dhcp",
    "network_config_static",
    "validate_user_data",
]

VOLUME_ID = "CIDATA"
MAX_USER_DATA = 16 * 1024 * 1024  # 16 MiB, also the limit for gzip-compressed data once decompressed
USER_DATA_KINDS = ("cloud-config", "script", "include", "cloud-boothook", "mime-multipart", "gzip")

# ISO 9660 level-1 names (8.3, upper case), Rock Ridge / Joliet names (what cloud-init reads).
_FILES = {
    "user-data": "/USERDATA.;1",
    "meta-data": "/METADATA.;1",
    "network-config": "/NETWORKC.;1",
}

_EXPECTED_FIRST_LINE = (
    "the first line must be '#cloud-config' (a YAML mapping follows), '#!' and an interpreter "
    "(a script, e.g. '#!/bin/sh'), '#include' (URLs follow), or '#cloud-boothook'; "
    "or give a MIME multipart message ('Content-Type: multipart/mixed; ...') or gzip-compressed data"
)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class CloudInitError(VmmError):
    """User data, meta data or network config for cloud-init is invalid, or the seed could not be written."""


# --- user data ---------------------------------------------------------------------------------------


def validate_user_data(data: bytes) -> str:
    """Check that cloud-init will act on `data`; return its kind (one of `USER_DATA_KINDS`).

    Accepted: `#cloud-config` (the rest must parse as a YAML mapping; an empty document counts as an
    empty mapping), `#!` scripts, `#include`, `#cloud-boothook`, MIME multipart messages, and gzip
    (whose decompressed content must itself be one of the other kinds). At most `MAX_USER_DATA` bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CloudInitError(
            f"user data must be bytes, not {type(data).__name__}: read the file in binary mode"
        )
    data = bytes(data)
    if len(data) > MAX_USER_DATA:
        raise CloudInitError(
            f"user data is {len(data)} bytes, more than cloud-init's limit of {MAX_USER_DATA} bytes "
            "(16 MiB): "
            "make it smaller (e.g. gzip it, or fetch large files from the guest with '#include' or runcmd)"
        )
    if data[:2] == b"\x1f\x8b":
        _validate_gzip(data)
        return "gzip"
    return _validate_text(data, where="user data")


def _validate_gzip(data: bytes) -> None:
    # Decompress at most MAX_USER_DATA + 1 bytes: a small gzip bomb must not fill memory.
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        inner = decompressor.decompress(data, MAX_USER_DATA + 1)
    except zlib.error as e:
        raise CloudInitError(
            f"user data starts with the gzip magic bytes 1f 8b but is not valid gzip ({e}): "
            "compress it again with 'gzip -c FILE', or give it uncompressed"
        ) from None
    if len(inner) > MAX_USER_DATA:
        raise CloudInitError(
            f"gzip-compressed user data is more than {MAX_USER_DATA} bytes (16 MiB) once decompressed: "
            "make it smaller"
        )
    if not decompressor.eof:
        raise CloudInitError(
            "gzip-compressed user data is truncated: compress the whole file again with gzip"
        )
    if inner[:2] == b"\x1f\x8b":
        raise CloudInitError(
            "user data is gzip-compressed twice: cloud-init decompresses once; compress it once"
        )
    _validate_text(inner, where="gzip-compressed user data (once decompressed)")


def _validate_text(data: bytes, *, where: str) -> str:
    if not data.strip():
        raise CloudInitError(f"{where} is empty: {_EXPECTED_FIRST_LINE}")
    if data.startswith(b"\xef\xbb\xbf"):
        raise CloudInitError(
            f"{where} starts with a UTF-8 byte order mark, which hides its first line from cloud-init: "
            "save the file as UTF-8 without BOM"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CloudInitError(
            f"{where} is neither UTF-8 text nor gzip "
            f"(invalid byte 0x{data[e.start]:02x} at offset {e.start}): "
            f"{_EXPECTED_FIRST_LINE}"
        ) from None
    first = text.split("\n", 1)[0].rstrip()
    if first == "#cloud-config":
        _validate_cloud_config(text, where=where)
        return "cloud-config"
    if first.startswith("#!"):
        if not first[2:].strip():
            raise CloudInitError(
                f"{where} is a script whose first line '#!' names no interpreter: write e.g. '#!/bin/sh'"
            )
        return "script"
    if first == "#include" or first.startswith(("#include ", "#include\t")):
        return "include"
    if first == "#cloud-boothook":
        return "cloud-boothook"
    if _is_mime_multipart(text):
        return "mime-multipart"
    shown = first if len(first) <= 60 else first[:57] + "..."
    hint = ""
    if first.startswith("#cloud-config"):
        hint = " (only '#cloud-config' itself is supported, alone on its line)"
    elif first.lower().startswith("content-type:") or first.lower().startswith("mime-version:"):
        hint = " (a MIME message must be multipart: Content-Type: multipart/mixed; boundary=...)"
    raise CloudInitError(f"{where} has an unsupported first line {shown!r}{hint}: {_EXPECTED_FIRST_LINE}")


def _validate_cloud_config(text: str, *, where: str) -> None:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CloudInitError(
            f"{where} is '#cloud-config' but not valid YAML{at}: {problem}; "
            "fix the YAML (indent with spaces, not tabs; quote values that contain ': ')"
        ) from None
    if doc is not None and not isinstance(doc, dict):
        raise CloudInitError(
            f"{where} is '#cloud-config' but its YAML is a {_yaml_kind(doc)}, not a mapping: "
            "write keys at the top level, e.g. 'packages: [curl]' or 'runcmd: [...]'"
        )


def _yaml_kind(doc: object) -> str:
    if isinstance(doc, list):
        return "list"
    if isinstance(doc, str):
        return "string"
    return type(doc).__name__


def _is_mime_multipart(text: str) -> bool:
    # A MIME message starts with its headers; only look at them (up to the first empty line).
    head = text[:65536]
    first = head.split("\n", 1)[0]
    if not re.match(r"^[A-Za-z0-9-]+:", first):
        return False
    message = email.message_from_string(head)
    return message.get_content_maintype() == "multipart" and message.get_boundary() is not None


# --- network config ----------------------------------------------------------------------------------


def _mac(mac: str) -> str:
    norm = mac.strip().lower().replace("-", ":")
    if not _MAC.match(norm):
        raise CloudInitError(f"invalid MAC address {mac!r}: write six hex bytes, e.g. 52:54:00:12:34:56")
    return norm


def _ethernet(mac: str) -> dict[str, Any]:
    return {"match": {"macaddress": _mac(mac)}, "set-name": "eth0"}


def network_config_dhcp(mac: str, *, dhcp6: bool = False) -> dict[str, Any]:
    """A netplan v2 document: the NIC with MAC `mac` is named eth0 and configured by DHCPv4 (and DHCPv6)."""
    eth = _ethernet(mac)
    eth["dhcp4"] = True
    if dhcp6:
        eth["dhcp6"] = True
    return {"version": 2, "ethernets": {"eth0": eth}}


def network_config_static(
    mac: str,
    addresses: Sequence[str],
    gateway4: str | None = None,
    gateway6: str | None = None,
    nameservers: Sequence[str] = (),
    search: Sequence[str] = (),
) -> dict[str, Any]:
    """A netplan v2 document: the NIC with MAC `mac` is named eth0 with static `addresses` (CIDR, e.g.
    10.0.0.5/24 or fd00::5/64), default routes via `gateway4`/`gateway6`, and DNS `nameservers`/`search`.
    Default routes are written as `routes` to 0.0.0.0/0 and ::/0 (netplan deprecated `gateway4`)."""
    if isinstance(addresses, str):
        addresses = [addresses]
    if not addresses:
        raise CloudInitError(
            "a static network config needs at least one address in CIDR form, e.g. 10.0.0.5/24"
        )
    families: set[int] = set()
    parsed: list[str] = []
    for text in addresses:
        if "/" not in text:
            raise CloudInitError(
                f"address {text!r} has no prefix length: write it in CIDR form, e.g. {text}/24"
            )
        try:
            iface = ipaddress.ip_interface(text.strip())
        except ValueError:
            raise CloudInitError(
                f"invalid address {text!r}: write an IPv4 or IPv6 address in CIDR form, e.g. 10.0.0.5/24"
            ) from None
        families.add(iface.version)
        parsed.append(str(iface))
    eth = _ethernet(mac)
    eth["addresses"] = parsed
    routes: list[dict[str, str]] = []
    for gateway, version, default in ((gateway4, 4, "0.0.0.0/0"), (gateway6, 6, "::/0")):
        if gateway is None:
            continue
        try:
            addr = ipaddress.ip_address(gateway.strip())
        except ValueError:
            raise CloudInitError(
                f"invalid gateway{version} {gateway!r}: give an IPv{version} address"
            ) from None
        if addr.version != version:
            raise CloudInitError(f"gateway{version} {gateway!r} is not an IPv{version} address")
        if version not in families:
            raise CloudInitError(
                f"gateway{version} {gateway} is given but no address is IPv{version}: "
                f"add an IPv{version} address in CIDR form, or drop the gateway"
            )
        routes.append({"to": default, "via": str(addr)})
    if routes:
        eth["routes"] = routes
    dns: dict[str, list[str]] = {}
    if isinstance(nameservers, str):
        nameservers = [nameservers]
    if isinstance(search, str):
        search = [search]
    if nameservers:
        servers = []
        for ns in nameservers:
            try:
                servers.append(str(ipaddress.ip_address(ns.strip())))
            except ValueError:
                raise CloudInitError(
                    f"invalid nameserver {ns!r}: give an IP address (not a host name), e.g. 10.0.0.1"
                ) from None
        dns["addresses"] = servers
    if search:
        domains = []
        for domain in search:
            d = domain.strip().rstrip(".").lower()
            if not _valid_hostname(d):
                raise CloudInitError(f"invalid search domain {domain!r}: give a DNS name such as example.com")
            domains.append(d)
        dns["search"] = domains
    if dns:
        eth["nameservers"] = dns
    return {"version": 2, "ethernets": {"eth0": eth}}


def _check_network_config(config: Mapping[str, Any]) -> None:
    if not isinstance(config, Mapping):
        raise CloudInitError(
            f"network config must be a mapping (a netplan v2 document), not {type(config).__name__}: "
            "use network_config_static or network_config_dhcp"
        )
    inner = config.get("network", config)
    version = inner.get("version") if isinstance(inner, Mapping) else None
    if version not in (1, 2):
        raise CloudInitError(
            f"network config has version {version!r}: give a netplan v2 document ('version: 2' with "
            "'ethernets: ...'), e.g. from network_config_static or network_config_dhcp"
        )


# --- meta data and the seed image ---------------------------------------------------------------------


def _valid_hostname(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _meta_data(instance_id: str, hostname: str, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if not instance_id or not instance_id.strip() or any(ord(c) < 32 or ord(c) == 127 for c in instance_id):
        raise CloudInitError(
            f"invalid instance id {instance_id!r}: give a non-empty id without control characters "
            "(cloud-init runs its once-per-instance steps again whenever the id changes)"
        )
    if not _valid_hostname(hostname):
        raise CloudInitError(
            f"invalid hostname {hostname!r}: use lower-case letters, digits and '-' in labels of at most "
            "63 characters separated by '.', not starting or ending with '-'"
        )
    meta: dict[str, Any] = {"instance-id": instance_id, "local-hostname": hostname}
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise CloudInitError(f"meta data key {key!r} is not a string")
        if key in meta:
            raise CloudInitError(
                f"meta_data_extra sets {key!r}: pass it as the "
                f"{'instance_id' if key == 'instance-id' else 'hostname'} argument"
            )
        meta[key] = value
    return meta


def _dump_yaml(doc: Mapping[str, Any], what: str) -> bytes:
    try:
        text: str = yaml.safe_dump(dict(doc), default_flow_style=False, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as e:
        raise CloudInitError(
            f"{what} cannot be written as YAML ({e}): use only strings, numbers, booleans, lists and mappings"
        ) from None
    return text.encode("utf-8")


def make_seed(
    out_path: str,
    *,
    user_data: bytes,
    instance_id: str,
    hostname: str,
    network_config: Mapping[str, Any] | None = None,
    meta_data_extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a NoCloud seed image (ISO 9660 + Joliet + Rock Ridge, volume id CIDATA) to `out_path`;
    return its absolute path. The user data is validated first (`validate_user_data`); the image is
    written to a temporary file beside `out_path` and renamed over it, mode 0600 (user data often
    holds passwords or keys). Nothing is left behind on failure."""
    validate_user_data(user_data)
    files = {
        "user-data": bytes(user_data),
        "meta-data": _dump_yaml(_meta_data(instance_id, hostname, meta_data_extra), "meta data"),
    }
    if network_config is not None:
        _check_network_config(network_config)
        files["network-config"] = _dump_yaml(network_config, "network config")

    out_path = os.path.abspath(out_path)
    directory = os.path.dirname(out_path)
    if not os.path.isdir(directory):
        raise CloudInitError(
            f"cannot write seed {out_path}: directory {directory} does not exist; create it first"
        )
    if os.path.isdir(out_path):
        raise CloudInitError(f"cannot write seed {out_path}: it is a directory; give a file path")

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=1, vol_ident=VOLUME_ID, sys_ident="LINUX", joliet=3, rock_ridge="1.09")
    streams = []
    try:
        for name, content in files.items():
            stream = io.BytesIO(content)
            streams.append(stream)
            iso.add_fp(
                stream, len(content), iso_path=_FILES[name], rr_name=name, joliet_path="/" + name,
                file_mode=0o100444,
            )  # fmt: skip
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(out_path) + ".", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as out:
                iso.write_fp(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as e:
        raise CloudInitError(
            f"cannot write seed {out_path}: {e.strerror or e}; check the directory"
        ) from None
    finally:
        iso.close()
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return out_path
