"""cocon.vmm.dhcp for real: busybox udhcpc gets its lease from DhcpResponder across namespaces.

The lab mirrors a full VM's network namespace (docs/vm-networking.md), with veths instead of the tap:

    netns B (the "guest")        netns A (the instance's namespace)            netns C (the "bridge")
    vguest  <-- veth -->  vtap  ==tc ingress mirred==>  eth0  <-- veth -->  vbridge
                               <==tc ingress mirred==

DhcpResponder listens on vtap in A, where tc redirects every incoming frame to eth0 (and back): it
still sees the guest's requests because packet taps get frames before tc's ingress hook, and its
replies go out of vtap to the guest only. Namespaces are made by the test and always deleted.
"""

from __future__ import annotations

import os
import random
import secrets
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from cocon import _linux
from cocon.vmm.dhcp import DhcpResponder, Lease

T = TypeVar("T")

GUEST_MAC = "52:54:00:6c:0c:01"
STRANGER_MAC = "52:54:00:6c:0c:99"
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() in a short-lived thread that joined the network namespace `name` (sockets it makes
    stay in that namespace)."""
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _linux.setns(fd, _linux.CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@dataclass
class Lab:
    a: str
    b: str
    c: str


@pytest.fixture
def lab() -> Iterator[Lab]:
    tag = secrets.token_hex(3)
    made = Lab(f"cocon-dhcp-{tag}-a", f"cocon-dhcp-{tag}-b", f"cocon-dhcp-{tag}-c")
    names = [made.a, made.b, made.c]
    try:
        for name in names:
            run("ip", "netns", "add", name)
        run(
            "ip",
            "-n",
            made.a,
            "link",
            "add",
            "vtap",
            "type",
            "veth",
            "peer",
            "name",
            "vguest",
            "netns",
            made.b,
        )
        run(
            "ip",
            "-n",
            made.a,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vbridge",
            "netns",
            made.c,
        )
        run("ip", "-n", made.b, "link", "set", "vguest", "address", GUEST_MAC)
        for ns, dev in ((made.a, "vtap"), (made.a, "eth0"), (made.b, "vguest"), (made.c, "vbridge")):
            run("ip", "-n", ns, "link", "set", dev, "up")
        for dev, to in (("vtap", "eth0"), ("eth0", "vtap")):  # what the VM shim sets up
            run("tc", "-n", made.a, "qdisc", "add", "dev", dev, "ingress")
            run("tc", "-n", made.a, "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all",
                "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to)  # fmt: skip
        yield made
    finally:
        for name in names:
            run("ip", "netns", "del", name, check=False)
        left = run("ip", "netns", "list").stdout
        assert not any(name in left for name in names), f"namespaces left behind: {left}"


class Loop:
    """The shim's selector loop, reduced to the responder, in a thread."""

    def __init__(self, responder: DhcpResponder) -> None:
        self.responder = responder
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dhcp-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.responder.fileno(), selectors.EVENT_READ, "dhcp")
                selector.register(self._stop_r, selectors.EVENT_READ, "stop")
                while True:
                    for key, _ in selector.select():
                        if key.data == "stop":
                            return
                        self.responder.on_readable()
        except BaseException as exc:  # the shim's loop would die: the test must say so
            self.error = exc

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)
        assert not self._thread.is_alive()
        assert self.error is None, f"on_readable() raised: {self.error!r}"


@pytest.fixture
def responder(lab: Lab) -> Iterator[DhcpResponder]:
    lease = Lease(
        mac=GUEST_MAC,
        address="10.77.0.5/16",
        gateway="10.77.0.1",
        dns=["10.77.0.1", "10.77.0.2"],
        search=["svc.cocon.internal", "cocon.internal"],
        hostname="vm-one",
        mtu=1450,
        lease_seconds=7200,
    )
    made = in_netns(lab.a, lambda: DhcpResponder("vtap", lease))
    loop = Loop(made)
    try:
        yield made
    finally:
        loop.stop()
        made.close()


def packet_socket(ifname: str, proto: int) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    sock.bind((ifname, proto))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[tuple[bytes, int]]:
    """Every frame queued on `sock`, with its packet type; closes it."""
    frames: list[tuple[bytes, int]] = []
    try:
        while True:
            try:
                data, address = sock.recvfrom(65536)
            except BlockingIOError:
                return frames
            frames.append((data, address[2]))
    finally:
        sock.close()


def dhcp_frames(frames: list[tuple[bytes, int]], port: int, incoming_only: bool = False) -> list[bytes]:
    """The IPv4/UDP frames to `port` (67: client requests, 68: server replies)."""
    found = []
    for data, pkttype in frames:
        if incoming_only and pkttype == socket.PACKET_OUTGOING:
            continue
        if len(data) < 42 or data[12:14] != b"\x08\x00" or data[23] != 17:
            continue
        ihl = (data[14] & 0x0F) * 4
        if struct.unpack("!H", data[14 + ihl + 2 : 14 + ihl + 4])[0] == port:
            found.append(data)
    return found


def udhcpc(lab: Lab, tmp_path: Path, *extra: str, tries: int = 3) -> tuple[int, dict[str, str]]:
    """busybox udhcpc in the guest namespace; its exit status and what its script got on `bound`."""
    out = tmp_path / "lease.env"
    out.unlink(missing_ok=True)
    script = tmp_path / "udhcpc.sh"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = bound ] || exit 0\n'
        f"for v in ip subnet router dns domain search hostname mtu lease serverid; do "
        f'eval "echo $v=\\$$v"; done > {out}\n'
    )
    script.chmod(0o755)
    proc = run(
        "ip", "netns", "exec", lab.b, "busybox", "udhcpc", "-i", "vguest", "-n", "-q", "-f", "-s", str(script),
        "-t", str(tries), "-T", "1", "-A", "1", *extra, check=False,
    )  # fmt: skip
    got = {}
    if out.exists():
        for line in out.read_text().splitlines():
            key, _, value = line.partition("=")
            got[key] = value
    return proc.returncode, got


@pytest.mark.parametrize("broadcast", [False, True], ids=["unicast-replies", "broadcast-replies"])
def test_guest_gets_its_lease_through_the_redirect(
    lab: Lab, responder: DhcpResponder, tmp_path: Path, broadcast: bool
) -> None:
    bridge_side = in_netns(lab.c, lambda: packet_socket("vbridge", ETH_P_ALL))
    ip_only = in_netns(lab.a, lambda: packet_socket("vtap", ETH_P_IP))
    guest_side = in_netns(lab.b, lambda: packet_socket("vguest", ETH_P_ALL))

    code, got = udhcpc(lab, tmp_path, *(["-B"] if broadcast else []))

    assert code == 0, "udhcpc got no lease"
    assert got["ip"] == "10.77.0.5"
    assert got["subnet"] == "255.255.0.0"
    assert got["router"] == "10.77.0.1"
    assert got["dns"].split() == ["10.77.0.1", "10.77.0.2"]
    assert got["domain"] == "svc.cocon.internal"
    assert got["search"].split() == ["svc.cocon.internal", "cocon.internal"]
    assert got["hostname"] == "vm-one"
    assert got["mtu"] == "1450"
    assert got["lease"] == "7200"
    assert got["serverid"] == "10.77.0.1"
    assert responder.answered == 2, "an OFFER and an ACK"
    replies = dhcp_frames(drain(guest_side), 68, incoming_only=True)
    assert len(replies) == 2
    for frame in replies:  # RFC 2131 4.1: broadcast when the client asks, else to chaddr/yiaddr
        if broadcast:
            assert frame[0:6] == b"\xff" * 6 and frame[30:34] == b"\xff" * 4
        else:
            assert frame[0:6].hex(":") == GUEST_MAC and socket.inet_ntoa(frame[30:34]) == "10.77.0.5"
        assert frame[6:12].hex(":") == responder.server_mac, "sent from the tap's own MAC"

    # tc really redirected the guest's frames: its DISCOVER and REQUEST reached the bridge side ...
    on_bridge = drain(bridge_side)
    requests = [f for f in dhcp_frames(on_bridge, 67) if f[6:12] == bytes.fromhex(GUEST_MAC.replace(":", ""))]
    assert len(requests) >= 2
    # ... while the replies went to the guest only
    assert dhcp_frames(on_bridge, 68) == []
    # and a socket for ETH_P_IP (delivered after tc's ingress hook) never saw a request
    assert dhcp_frames(drain(ip_only), 67, incoming_only=True) == []


def test_another_mac_gets_no_answer(lab: Lab, responder: DhcpResponder, tmp_path: Path) -> None:
    run("ip", "-n", lab.b, "link", "set", "vguest", "address", STRANGER_MAC)
    bridge_side = in_netns(lab.c, lambda: packet_socket("vbridge", ETH_P_ALL))

    code, got = udhcpc(lab, tmp_path, tries=2)

    assert code != 0 and got == {}, "a MAC that is not the lease's got an address"
    assert responder.answered == 0
    assert responder.ignored >= 2, "the responder saw the stranger's DISCOVERs"
    stranger = bytes.fromhex(STRANGER_MAC.replace(":", ""))
    assert any(f[6:12] == stranger for f in dhcp_frames(drain(bridge_side), 67))


def test_garbage_from_the_guest_does_not_stop_the_responder(
    lab: Lab, responder: DhcpResponder, tmp_path: Path
) -> None:
    rng = random.Random(7)
    guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))

    def frame(payload: bytes) -> bytes:
        udp = struct.pack("!HHHH", 68, 67, 8 + len(payload), 0) + payload
        ip = bytearray(
            struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4)
        )
        total = sum(struct.unpack("!10H", ip))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
        return b"\xff" * 6 + guest_mac + b"\x08\x00" + bytes(ip) + udp

    def send_garbage() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind(("vguest", 0))
            for i in range(300):
                # random BOOTP-sized payloads, half of them with a request header and the magic cookie
                payload = bytearray(rng.randbytes(rng.randrange(0, 600)))
                if i % 2 and len(payload) > 250:
                    payload[0:4] = b"\x01\x01\x06\x00"
                    payload[236:240] = b"\x63\x82\x53\x63"
                sock.send(frame(bytes(payload)))
                if i % 20 == 19:  # in batches that fit the socket's receive buffer: none is dropped
                    deadline = time.monotonic() + 10
                    while responder.ignored < i + 1 and time.monotonic() < deadline:
                        time.sleep(0.005)

    in_netns(lab.b, send_garbage)
    code, got = udhcpc(lab, tmp_path)
    assert code == 0 and got["ip"] == "10.77.0.5"
    assert responder.ignored >= 300 and responder.answered == 2
