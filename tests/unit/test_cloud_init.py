"""cocon.vmm.cloud_init without images: which user data cloud-init will act on, and the netplan v2
documents for the seed's network-config."""

from __future__ import annotations

import gzip
import os

import pytest
import yaml

from cocon.vmm.cloud_init import (
    MAX_USER_DATA,
    CloudInitError,
    make_seed,
    network_config_dhcp,
    network_config_static,
    validate_user_data,
)
from cocon.vmm.errors import VmmError

MIME = (
    b'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
    b"--XX\nContent-Type: text/cloud-config\n\n#cloud-config\nruncmd: [true]\n--XX--\n"
)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"#cloud-config\npackages: [curl]\nruncmd:\n  - echo hi\n", "cloud-config"),
        (b"#cloud-config\n", "cloud-config"),  # empty document: an empty mapping
        (b"#cloud-config\r\nusers: []\r\n", "cloud-config"),  # CRLF line ends
        (b"#!/bin/sh\necho hello\n", "script"),
        (b"#!/usr/bin/env python3\nprint(1)\n", "script"),
        (b"#include\nhttp://10.0.0.1/a.yaml\n", "include"),
        (b"#include http://10.0.0.1/a.yaml\n", "include"),
        (b"#cloud-boothook\n#!/bin/sh\necho boot\n", "cloud-boothook"),
        (MIME, "mime-multipart"),
        (b"MIME-Version: 1.0\n" + MIME.replace(b"MIME-Version: 1.0\n", b""), "mime-multipart"),
        (gzip.compress(b"#cloud-config\nhostname: x\n"), "gzip"),
        (gzip.compress(b"#!/bin/sh\ntrue\n"), "gzip"),
        (
            "#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: 'héllo ✓'\n".encode(),
            "cloud-config",
        ),
    ],
)
def test_accepted_kinds(data: bytes, kind: str) -> None:
    assert validate_user_data(data) == kind


def _error(data: bytes) -> str:
    with pytest.raises(CloudInitError) as info:
        validate_user_data(data)
    assert isinstance(info.value, VmmError)
    return str(info.value)


def test_unknown_first_line_says_what_the_first_line_must_be() -> None:
    msg = _error(b"packages: [curl]\n")
    assert "'packages: [curl]'" in msg
    assert "'#cloud-config'" in msg and "'#!'" in msg and "'#include'" in msg and "'#cloud-boothook'" in msg
    assert "MIME multipart" in msg and "gzip" in msg


def test_cloud_config_variants_that_cloud_init_ignores() -> None:
    assert "only '#cloud-config' itself" in _error(b"#cloud-config-archive\n- content: x\n")
    assert "first line" in _error(b"# cloud-config\nruncmd: []\n")
    assert "first line" in _error(b"  #cloud-config\nruncmd: []\n")  # leading space: not recognised
    assert "first line" in _error(b"#CLOUD-CONFIG\nruncmd: []\n")


def test_cloud_config_must_be_a_yaml_mapping() -> None:
    msg = _error(b"#cloud-config\nruncmd:\n  - a\n - b\n")
    assert "not valid YAML at line" in msg and "fix the YAML" in msg
    msg = _error(b"#cloud-config\n\tpackages: [curl]\n")
    assert "not valid YAML" in msg and "tabs" in msg
    assert "is a list, not a mapping" in _error(b"#cloud-config\n- a\n- b\n")
    assert "is a string, not a mapping" in _error(b"#cloud-config\njust words\n")


def test_empty_and_blank() -> None:
    assert "is empty" in _error(b"")
    assert "is empty" in _error(b"\n \n")


def test_non_utf8_text() -> None:
    msg = _error(b"#cloud-config\nhostname: caf\xe9\n")
    assert "neither UTF-8 text nor gzip" in msg and "0xe9 at offset 27" in msg
    assert "first line must be '#cloud-config'" in msg


def test_byte_order_mark() -> None:
    assert "byte order mark" in _error(b"\xef\xbb\xbf#cloud-config\nruncmd: []\n")


def test_script_without_interpreter() -> None:
    assert "names no interpreter" in _error(b"#!\necho\n")


def test_mime_must_be_multipart() -> None:
    assert "must be multipart" in _error(b"Content-Type: text/plain\n\nhello\n")
    assert "first line" in _error(b"Subject: hi\n\nbody\n")


def test_size_limit() -> None:
    big = b"#!/bin/sh\n" + b"#" * MAX_USER_DATA
    assert "16 MiB" in _error(big)
    ok = b"#!/bin/sh\n" + b"#" * (MAX_USER_DATA - 10)
    assert validate_user_data(ok) == "script"


def test_gzip_content_is_checked_too() -> None:
    assert "gzip-compressed user data (once decompressed) has an unsupported first line" in _error(
        gzip.compress(b"hello\n")
    )
    assert "not valid gzip" in _error(b"\x1f\x8b" + b"garbage" * 10)
    assert "truncated" in _error(gzip.compress(b"#cloud-config\n" + os.urandom(2000).hex().encode())[:-30])
    assert "twice" in _error(gzip.compress(gzip.compress(b"#cloud-config\n")))
    # a gzip bomb is refused without inflating it all
    bomb = gzip.compress(b"#!/bin/sh\n" + b"\0" * (MAX_USER_DATA + 100), compresslevel=9)
    assert len(bomb) < 100_000
    assert "once decompressed" in _error(bomb)


def test_not_bytes() -> None:
    with pytest.raises(CloudInitError, match="must be bytes"):
        validate_user_data("#cloud-config\n")  # type: ignore[arg-type]


def test_network_config_dhcp() -> None:
    assert network_config_dhcp("52:54:00:AB:cd:01") == {
        "version": 2,
        "ethernets": {
            "eth0": {"match": {"macaddress": "52:54:00:ab:cd:01"}, "set-name": "eth0", "dhcp4": True}
        },
    }
    assert network_config_dhcp("52-54-00-ab-cd-01", dhcp6=True)["ethernets"]["eth0"]["dhcp6"] is True


def test_network_config_static() -> None:
    doc = network_config_static(
        "52:54:00:12:34:56",
        ["10.0.0.5/24", "fd00::5/64"],
        gateway4="10.0.0.1",
        gateway6="fd00::1",
        nameservers=["10.0.0.1", "fd00::1"],
        search=["example.com", "Lab.Example.org."],
    )
    assert doc == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": "52:54:00:12:34:56"},
                "set-name": "eth0",
                "addresses": ["10.0.0.5/24", "fd00::5/64"],
                "routes": [{"to": "0.0.0.0/0", "via": "10.0.0.1"}, {"to": "::/0", "via": "fd00::1"}],
                "nameservers": {
                    "addresses": ["10.0.0.1", "fd00::1"],
                    "search": ["example.com", "lab.example.org"],
                },
            }
        },
    }
    # round-trips through YAML as the seed writes it
    assert yaml.safe_load(yaml.safe_dump(doc)) == doc
    minimal = network_config_static("52:54:00:12:34:56", ["192.168.1.2/32"])
    assert minimal["ethernets"]["eth0"] == {
        "match": {"macaddress": "52:54:00:12:34:56"},
        "set-name": "eth0",
        "addresses": ["192.168.1.2/32"],
    }


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"mac": "52:54:00:12:34"}, "invalid MAC address"),
        ({"mac": "zz:54:00:12:34:56"}, "invalid MAC address"),
        ({"addresses": []}, "at least one address"),
        ({"addresses": ["10.0.0.5"]}, "no prefix length"),
        ({"addresses": ["10.0.0.300/24"]}, "invalid address"),
        ({"gateway4": "fd00::1"}, "is not an IPv4 address"),
        ({"gateway4": "router"}, "invalid gateway4"),
        ({"gateway6": "fd00::1"}, "no address is IPv6"),
        ({"nameservers": ["dns.example.com"]}, "not a host name"),
        ({"search": ["bad_domain"]}, "invalid search domain"),
    ],
)
def test_network_config_static_errors(kw: dict[str, object], expected: str) -> None:
    args: dict[str, object] = {"mac": "52:54:00:12:34:56", "addresses": ["10.0.0.5/24"], **kw}
    with pytest.raises(CloudInitError, match=expected):
        network_config_static(**args)  # type: ignore[arg-type]


def test_make_seed_refuses_bad_input_and_writes_nothing(tmp_path: str) -> None:
    out = os.path.join(str(tmp_path), "seed.iso")
    good = {"user_data": b"#cloud-config\n", "instance_id": "i-1", "hostname": "vm1"}
    cases: list[tuple[dict[str, object], str]] = [
        ({"user_data": b"hello"}, "unsupported first line"),
        ({"hostname": "bad_name"}, "invalid hostname"),
        ({"hostname": "-x"}, "invalid hostname"),
        ({"hostname": "a" * 64}, "invalid hostname"),
        ({"instance_id": ""}, "invalid instance id"),
        ({"instance_id": "a\nb"}, "invalid instance id"),
        ({"meta_data_extra": {"instance-id": "x"}}, "pass it as the instance_id argument"),
        ({"meta_data_extra": {"local-hostname": "x"}}, "pass it as the hostname argument"),
        ({"meta_data_extra": {"k": object()}}, "cannot be written as YAML"),
        ({"network_config": {"ethernets": {}}}, "network config has version None"),
        ({"network_config": ["version", 2]}, "must be a mapping"),
    ]
    for override, expected in cases:
        with pytest.raises(CloudInitError, match=expected):
            make_seed(out, **{**good, **override})  # type: ignore[arg-type]
    with pytest.raises(CloudInitError, match="does not exist; create it first"):
        make_seed(os.path.join(str(tmp_path), "no", "seed.iso"), **good)  # type: ignore[arg-type]
    with pytest.raises(CloudInitError, match="is a directory"):
        make_seed(str(tmp_path), **good)  # type: ignore[arg-type]
    assert os.listdir(str(tmp_path)) == []
