"""DHCPv4 for one guest NIC: the full VM shim answers its guest's DHCP itself (docs/vm-networking.md).

A full VM's NIC is the tap `tap0` in the instance's network namespace, and tc (mirred) redirects every
frame between tap0 and the namespace's `eth0`, so the guest's frames never reach the namespace's IP
stack and no ordinary UDP socket could see its DHCPDISCOVER. A packet socket bound to tap0 with
ETH_P_ALL does: the kernel hands ingress frames to such "packet taps" before tc's ingress hook
redirects them (a socket bound to ETH_P_IP does NOT: protocol handlers run after tc). Replies are
complete Ethernet frames sent out through the same socket, so they go to the guest only.

- `Lease`: what the guest gets (its MAC, address/prefix, gateway, DNS, search list, host name, MTU).
- `parse(frame)`: a `DhcpRequest` for an Ethernet/IPv4/UDP 68->67 BOOTREQUEST with the DHCP magic
  cookie and a message type, else None. The frames come from the guest: never trusted, never raises.
- `reply(request, lease)`: the answer as a complete Ethernet frame, or None when there is nothing to
  say (another MAC, another server's offer, RELEASE, DECLINE, relayed requests, ...).
- `DhcpResponder(interface, lease)`: the packet socket, for a selector loop (`fileno()`,
  `on_readable()`, `close()`); non-blocking, a kernel BPF filter lets only DHCP requests through.

The lease is static (one address per NIC, decided by cocon's IPAM), so the server keeps no state:
RELEASE and DECLINE change nothing (DECLINE is logged: something else uses the address).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import re
import socket
import struct
from dataclasses import dataclass, field

from cocon.vmm.errors import VmmError

log = logging.getLogger(__name__)

__all__ = [
    "DhcpError",
    "DhcpRequest",
    "DhcpResponder",
    "Lease",
    "encode_search_list",
    "parse",
    "reply",
]

# DHCP message types (option 53), RFC 2132 9.6
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

MESSAGE_NAMES = {
    DISCOVER: "DHCPDISCOVER",
    OFFER: "DHCPOFFER",
    REQUEST: "DHCPREQUEST",
    DECLINE: "DHCPDECLINE",
    ACK: "DHCPACK",
    NAK: "DHCPNAK",
    RELEASE: "DHCPRELEASE",
    INFORM: "DHCPINFORM",
}

# options (RFC 2132, RFC 3397)
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_REQUESTED_ADDRESS = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMETER_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTREQUEST = 1
BOOTREPLY = 2
SERVER_PORT = 67
CLIENT_PORT = 68
BROADCAST_FLAG = 0x8000
INFINITE = 0xFFFFFFFF

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
DEFAULT_SERVER_MAC = "02:00:00:00:00:01"

_ETH_BROADCAST = b"\xff" * 6
_IP_BROADCAST = b"\xff" * 4
_ZERO_IP = b"\0" * 4
_BOOTP_FIXED = 236  # op .. file, before the magic cookie
_BOOTP_MIN = 300  # RFC 1542: BOOTP relays and old clients drop shorter messages
_MIN_MAX_MESSAGE = 576  # RFC 2131: every client takes IP datagrams of 576 bytes
_MAX_FRAMES_PER_CALL = 256  # on_readable's bound, so that a flooding guest cannot starve the loop
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})$")


class DhcpError(VmmError):
    """A lease that cannot be served, or a responder that cannot be set up."""


# --- the lease ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """What the guest with `mac` gets: `address` with its prefix ("10.88.0.5/16"), the default
    `gateway`, `dns` servers, the DNS `search` list (its first entry is also the domain name, option
    15), a `hostname`, the link `mtu`. `server_id` (the DHCP server identifier, also the source
    address of the replies) defaults to the gateway, else the network's first host (its last one
    when the first is the guest's own address). Validated and normalized on construction."""

    mac: str
    address: str
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    hostname: str | None = None
    mtu: int | None = None
    lease_seconds: int = 86400
    server_id: str | None = None

    def __post_init__(self) -> None:
        mac = _mac_bytes(self.mac)
        if mac is None or mac[0] & 1:
            raise DhcpError(
                f"lease MAC {self.mac!r} is not a unicast Ethernet address: give one like 52:54:00:12:34:56"
            )
        set_ = object.__setattr__
        set_(self, "mac", _mac_text(mac))
        if "/" not in self.address:
            raise DhcpError(
                f"lease address {self.address!r} has no prefix length: give it as CIDR, e.g. 10.88.0.5/16"
            )
        try:
            interface = ipaddress.IPv4Interface(self.address)
        except ValueError:
            raise DhcpError(
                f"lease address {self.address!r} is not an IPv4 address in CIDR form (10.88.0.5/16)"
            ) from None
        network = interface.network
        if network.prefixlen < 31 and interface.ip in (network.network_address, network.broadcast_address):
            which = "network" if interface.ip == network.network_address else "broadcast"
            raise DhcpError(
                f"lease address {self.address} is its network's {which} address: pick a host address"
            )
        set_(self, "address", str(interface))
        gateway = _ipv4(self.gateway, "gateway") if self.gateway is not None else None
        if gateway is not None:
            if gateway == interface.ip:
                raise DhcpError(
                    f"lease gateway {gateway} is the guest's own address: give the network's router"
                )
            set_(self, "gateway", str(gateway))
        dns = [str(_ipv4(server, "DNS server")) for server in self.dns]
        if len(dns) > 63:
            raise DhcpError(f"lease has {len(dns)} DNS servers; DHCP carries at most 63: keep the first few")
        set_(self, "dns", dns)
        search = [_domain(name, "search domain") for name in self.search]
        set_(self, "search", search)
        if self.hostname is not None:
            set_(self, "hostname", _domain(self.hostname, "host name"))
        if self.mtu is not None and not (68 <= self.mtu <= 65535):
            raise DhcpError(f"lease MTU {self.mtu} is out of range: DHCP allows 68 to 65535")
        if not (1 <= self.lease_seconds <= INFINITE):
            raise DhcpError(
                f"lease time {self.lease_seconds} s is out of range: give 1 to {INFINITE} (infinite)"
            )
        if self.server_id is not None:
            server = _ipv4(self.server_id, "server identifier")
        elif gateway is not None:
            server = gateway
        else:
            candidates = [network.network_address + 1, network.broadcast_address - 1]
            if network.prefixlen == 31:
                candidates = [network.network_address, network.broadcast_address]
            others = [a for a in candidates if a in network and a != interface.ip]
            if network.prefixlen == 32 or not others:
                raise DhcpError(
                    f"lease address {self.address} leaves no address for the DHCP server: "
                    "give a gateway or server_id"
                )
            server = others[0]
        if server == interface.ip:
            raise DhcpError(f"lease server identifier {server} is the guest's own address: give another one")
        set_(self, "server_id", str(server))

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The guest's address with its network."""
        return ipaddress.IPv4Interface(self.address)

    @property
    def server_address(self) -> ipaddress.IPv4Address:
        """The DHCP server identifier (option 54) and source address of replies."""
        assert self.server_id is not None  # resolved by __post_init__
        return ipaddress.IPv4Address(self.server_id)


def _ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise DhcpError(
            f"lease {what} {text!r} is not an IPv4 address: DHCPv4 carries IPv4 addresses only"
        ) from None


def _domain(text: str, what: str) -> str:
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise DhcpError(
            f"lease {what} {text!r} is not a DNS name: "
            "use labels of 1-63 letters, digits, '-' or '_' joined by dots"
        )
    return name


# --- parsing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DhcpRequest:
    """A client's DHCP message as the guest sent it (addresses as dotted text, MACs as aa:bb:..).
    `options` holds every option, each occurrence concatenated (RFC 3396)."""

    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    message_type: int
    xid: int
    secs: int
    flags: int
    hops: int
    ciaddr: str
    giaddr: str
    chaddr: str
    options: dict[int, bytes]
    requested_address: str | None = None
    server_id: str | None = None
    client_id: bytes | None = None
    max_message_size: int | None = None
    parameter_requests: tuple[int, ...] = ()
    hostname: str | None = None

    @property
    def broadcast(self) -> bool:
        """The client asked for broadcast replies (it cannot take unicast before it is configured)."""
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def message_name(self) -> str:
        return MESSAGE_NAMES.get(self.message_type, f"DHCP message type {self.message_type}")


def parse(frame: bytes | bytearray | memoryview) -> DhcpRequest | None:
    """The DHCP request in an Ethernet frame, or None for anything else (other traffic, BOOTP
    without a message type, fragments, malformed headers or options). Never raises on bad input."""
    try:
        return _parse(bytes(frame))
    except (ValueError, IndexError, struct.error):  # belt and braces: _parse checks every length
        return None


def _parse(frame: bytes) -> DhcpRequest | None:
    if len(frame) < 14 + 20 + 8 + _BOOTP_FIXED + 4:
        return None
    if frame[12:14] != b"\x08\x00":
        return None
    ip = 14
    if frame[ip] >> 4 != 4:
        return None
    ihl = (frame[ip] & 0x0F) * 4
    total = int.from_bytes(frame[ip + 2 : ip + 4], "big")
    if ihl < 20 or total < ihl + 8 or ip + total > len(frame):
        return None
    if int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x3FFF:  # a fragment (MF or an offset)
        return None
    if frame[ip + 9] != socket.IPPROTO_UDP or _checksum(frame[ip : ip + ihl]) != 0:
        return None
    udp = ip + ihl
    sport, dport, udp_length = struct.unpack_from("!HHH", frame, udp)
    # The UDP checksum is not checked: a guest's kernel UDP socket (renewals) may leave it to a
    # checksum offload that the packet tap sees before it happens.
    if sport != CLIENT_PORT or dport != SERVER_PORT or udp_length < 8 or udp + udp_length > ip + total:
        return None
    bootp = frame[udp + 8 : udp + udp_length]
    if len(bootp) < _BOOTP_FIXED + 4 or bootp[_BOOTP_FIXED : _BOOTP_FIXED + 4] != MAGIC_COOKIE:
        return None
    op, htype, hlen, hops, xid, secs, flags = struct.unpack_from("!BBBBIHH", bootp, 0)
    if op != BOOTREQUEST or htype != 1 or hlen != 6:  # Ethernet clients only
        return None
    options = _parse_options(bootp[_BOOTP_FIXED + 4 :])
    if options is None:
        return None
    overload = options.get(OPT_OVERLOAD)
    if overload is not None:  # RFC 2132 9.3: more options in `file` (1), `sname` (2) or both (3)
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            return None
        for bit, start, end in ((1, 108, 236), (2, 44, 108)):
            if overload[0] & bit:
                more = _parse_options(bootp[start:end])
                if more is None:
                    return None
                for code, value in more.items():
                    options[code] = options.get(code, b"") + value
    message_type = options.get(OPT_MESSAGE_TYPE)
    if message_type is None or len(message_type) != 1:
        return None

    def address(code: int) -> str | None:
        value = options.get(code)
        return socket.inet_ntoa(value) if value is not None and len(value) == 4 else None

    max_size = options.get(OPT_MAX_MESSAGE_SIZE)
    client_id = options.get(OPT_CLIENT_ID)
    hostname = options.get(OPT_HOSTNAME)
    return DhcpRequest(
        src_mac=_mac_text(frame[6:12]),
        dst_mac=_mac_text(frame[0:6]),
        src_ip=socket.inet_ntoa(frame[ip + 12 : ip + 16]),
        dst_ip=socket.inet_ntoa(frame[ip + 16 : ip + 20]),
        message_type=message_type[0],
        xid=xid,
        secs=secs,
        flags=flags,
        hops=hops,
        ciaddr=socket.inet_ntoa(bootp[12:16]),
        giaddr=socket.inet_ntoa(bootp[24:28]),
        chaddr=_mac_text(bootp[28:34]),
        options=options,
        requested_address=address(OPT_REQUESTED_ADDRESS),
        server_id=address(OPT_SERVER_ID),
        client_id=client_id if client_id else None,
        max_message_size=int.from_bytes(max_size, "big")
        if max_size is not None and len(max_size) == 2
        else None,
        parameter_requests=tuple(options.get(OPT_PARAMETER_REQUEST, b"")),
        hostname=hostname.decode("ascii", "replace") if hostname else None,
    )


def _parse_options(data: bytes) -> dict[int, bytes] | None:
    """Options up to END (or the end of `data`), each code's instances joined (RFC 3396); None
    when an option runs past the end. Linear in the length of `data`, whatever the guest sends."""
    parts: dict[int, list[bytes]] = {}
    i, end = 0, len(data)
    while i < end:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 2 > end or i + 2 + data[i + 1] > end:
            return None
        length = data[i + 1]
        parts.setdefault(code, []).append(data[i + 2 : i + 2 + length])
        i += 2 + length
    return {code: b"".join(values) for code, values in parts.items()}


# --- replying ----------------------------------------------------------------------------------


def reply(request: DhcpRequest, lease: Lease, *, server_mac: str = DEFAULT_SERVER_MAC) -> bytes | None:
    """The answer to `request` as a complete Ethernet frame from `server_mac`, or None.

    DISCOVER -> OFFER; REQUEST for the lease's address (SELECTING with our server id, INIT-REBOOT,
    RENEWING/REBINDING) -> ACK, for another address -> NAK, selecting another server -> None;
    INFORM -> ACK with the configuration but no lease times; RELEASE, DECLINE -> None. Only the
    lease's MAC is answered (chaddr and Ethernet source), only unrelayed requests (giaddr 0) sent to
    a broadcast address or to our server id. The reply goes to ciaddr when the client has one, else
    to broadcast when the client set the broadcast flag, else to chaddr/yiaddr; NAKs broadcast."""
    if request.chaddr != lease.mac or request.src_mac != lease.mac or request.giaddr != "0.0.0.0":
        return None
    interface = lease.interface
    server = lease.server_address
    if request.dst_ip not in ("255.255.255.255", str(interface.network.broadcast_address), str(server)):
        return None
    mine = str(interface.ip)
    inform = False
    if request.message_type == DISCOVER:
        kind = OFFER
    elif request.message_type == REQUEST:
        if request.server_id is not None:  # SELECTING: the client picked an offer
            if request.server_id != str(server):
                return None
            wanted = request.requested_address or request.ciaddr
        elif request.requested_address is not None:  # INIT-REBOOT: a remembered address
            wanted = request.requested_address
        elif request.ciaddr != "0.0.0.0":  # RENEWING / REBINDING
            wanted = request.ciaddr
        else:
            return None
        kind = ACK if wanted == mine else NAK
    elif request.message_type == INFORM:
        kind, inform = ACK, True
    else:  # RELEASE and DECLINE change nothing (the lease is static); server messages are not ours
        return None

    ciaddr = socket.inet_aton(request.ciaddr) if kind == ACK else _ZERO_IP
    yiaddr = interface.ip.packed if kind != NAK and not inform else _ZERO_IP
    options = _reply_options(kind, inform, lease, request)

    if kind == NAK or (request.ciaddr == "0.0.0.0" and (request.broadcast or yiaddr == _ZERO_IP)):
        dst_mac, dst_ip = _ETH_BROADCAST, _IP_BROADCAST
    elif request.ciaddr != "0.0.0.0":
        dst_mac, dst_ip = _mac_bytes_checked(request.chaddr), socket.inet_aton(request.ciaddr)
    else:
        dst_mac, dst_ip = _mac_bytes_checked(request.chaddr), yiaddr

    limit = max(_MIN_MAX_MESSAGE, min(request.max_message_size or _MIN_MAX_MESSAGE, lease.mtu or 1500))
    room = limit - 20 - 8 - _BOOTP_FIXED - len(MAGIC_COOKIE)
    for droppable in (OPT_DOMAIN_SEARCH, OPT_HOSTNAME, OPT_DOMAIN_NAME):  # least needed first
        if len(_encode_options(options)) <= room:
            break
        options = [(code, value) for code, value in options if code != droppable]
    encoded = _encode_options(options)

    bootp = (
        struct.pack("!BBBBIHH", BOOTREPLY, 1, 6, 0, request.xid, 0, request.flags)
        + ciaddr
        + yiaddr
        + _ZERO_IP  # siaddr: no next boot server
        + _ZERO_IP  # giaddr: requests through relays are not answered
        + _mac_bytes_checked(request.chaddr)
        + b"\0" * 10
        + b"\0" * (64 + 128)  # sname, file
        + MAGIC_COOKIE
        + encoded
    )
    if len(bootp) < _BOOTP_MIN:
        bootp += b"\0" * (_BOOTP_MIN - len(bootp))
    return _ethernet(dst_mac, _mac_bytes_checked(server_mac), _udp_ipv4(server.packed, dst_ip, bootp))


def _reply_options(kind: int, inform: bool, lease: Lease, request: DhcpRequest) -> list[tuple[int, bytes]]:
    options: list[tuple[int, bytes]] = [
        (OPT_MESSAGE_TYPE, bytes([kind])),
        (OPT_SERVER_ID, lease.server_address.packed),
    ]
    if kind == NAK:
        options.append(
            (OPT_MESSAGE, f"address not available: this client's address is {lease.address}".encode())
        )
    else:
        if not inform:
            seconds = lease.lease_seconds
            t1 = INFINITE if seconds == INFINITE else seconds // 2
            t2 = INFINITE if seconds == INFINITE else seconds * 7 // 8
            options += [
                (OPT_LEASE_TIME, seconds.to_bytes(4, "big")),
                (OPT_RENEWAL_TIME, t1.to_bytes(4, "big")),
                (OPT_REBINDING_TIME, t2.to_bytes(4, "big")),
            ]
        options.append((OPT_SUBNET_MASK, lease.interface.netmask.packed))
        if lease.gateway is not None:
            options.append((OPT_ROUTER, socket.inet_aton(lease.gateway)))
        if lease.dns:
            options.append((OPT_DNS, b"".join(socket.inet_aton(server) for server in lease.dns)))
        if lease.search:
            options.append((OPT_DOMAIN_NAME, lease.search[0].encode("ascii")))
            options.append((OPT_DOMAIN_SEARCH, encode_search_list(lease.search)))
        if lease.hostname is not None:
            options.append((OPT_HOSTNAME, lease.hostname.encode("ascii")))
        if lease.mtu is not None:
            options.append((OPT_MTU, lease.mtu.to_bytes(2, "big")))
    if request.client_id is not None:  # RFC 6842: echo the client identifier
        options.append((OPT_CLIENT_ID, request.client_id))
    return options


def _encode_options(options: list[tuple[int, bytes]]) -> bytes:
    """Options then END; values over 255 bytes are split into several instances (RFC 3396)."""
    out = bytearray()
    for code, value in options:
        for start in range(0, max(len(value), 1), 255):
            chunk = value[start : start + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    return bytes(out)


def encode_search_list(domains: list[str]) -> bytes:
    """The domain search option's value (RFC 3397): names in DNS wire format, with RFC 1035
    compression pointers (offsets into this value) for suffixes already written."""
    out = bytearray()
    seen: dict[tuple[str, ...], int] = {}
    for domain in domains:
        labels = [label for label in domain.rstrip(".").split(".") if label]
        for i in range(len(labels)):
            suffix = tuple(label.lower() for label in labels[i:])
            if suffix in seen:
                out += struct.pack("!H", 0xC000 | seen[suffix])
                break
            if len(out) < 0x4000:
                seen[suffix] = len(out)
            label = labels[i].encode("ascii")
            out += bytes((len(label),)) + label
        else:
            out.append(0)
    return bytes(out)


def _udp_ipv4(src: bytes, dst: bytes, payload: bytes) -> bytes:
    udp_length = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, udp_length)
    header = struct.pack("!HHHH", SERVER_PORT, CLIENT_PORT, udp_length, 0)
    udp_sum = _checksum(pseudo + header + payload) or 0xFFFF
    udp = struct.pack("!HHHH", SERVER_PORT, CLIENT_PORT, udp_length, udp_sum) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + udp


def _ethernet(dst: bytes, src: bytes, packet: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETH_P_IP) + packet


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); 0 when `data` already holds a correct one."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _mac_bytes(text: str) -> bytes | None:
    parts = re.split(r"[:-]", text.strip())
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", part) for part in parts):
        return None
    return bytes(int(part, 16) for part in parts)


def _mac_bytes_checked(text: str) -> bytes:
    mac = _mac_bytes(text)
    if mac is None:
        raise DhcpError(f"{text!r} is not an Ethernet MAC address: give one like 52:54:00:12:34:56")
    return mac


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# --- the responder -----------------------------------------------------------------------------

# Classic BPF run by the kernel on every frame of the interface: keep incoming, untagged,
# unfragmented IPv4/UDP to port 67; drop the rest (outgoing frames included: our own replies and
# what tc redirects to the guest) before it wakes the shim. (code, jt, jf, k)
_SKF_AD = 0xFFFFF000
_FILTER = (
    (0x20, 0, 0, _SKF_AD + 4),  # 0: ld pkttype
    (0x15, 12, 0, PACKET_OUTGOING),  # 1: jeq OUTGOING -> drop
    (0x20, 0, 0, _SKF_AD + 48),  # 2: ld vlan_tag_present
    (0x15, 0, 10, 0),  # 3: jeq 0 else drop
    (0x28, 0, 0, 12),  # 4: ldh ethertype
    (0x15, 0, 8, ETH_P_IP),  # 5: jeq IPv4 else drop
    (0x30, 0, 0, 23),  # 6: ldb protocol
    (0x15, 0, 6, socket.IPPROTO_UDP),  # 7: jeq UDP else drop
    (0x28, 0, 0, 20),  # 8: ldh flags/fragment offset
    (0x45, 4, 0, 0x3FFF),  # 9: jset MF|offset -> drop
    (0xB1, 0, 0, 14),  # 10: ldx 4*([14]&0xf)
    (0x48, 0, 0, 16),  # 11: ldh [x+16] (UDP destination port)
    (0x15, 0, 1, SERVER_PORT),  # 12: jeq 67 else drop
    (0x06, 0, 0, 0xFFFF),  # 13: accept
    (0x06, 0, 0, 0),  # 14: drop
)
_SO_ATTACH_FILTER = 26


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _attach_filter(sock: socket.socket) -> None:
    program = b"".join(struct.pack("=HBBI", *insn) for insn in _FILTER)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(_FILTER), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, bytes(fprog))


class DhcpResponder:
    """Answers the DHCP of the guest behind `interface` (the tap) with `lease`.

    Made in the network namespace of the interface (the socket stays in it). For a selector loop:
    register `fileno()` for reading and call `on_readable()`; it never blocks and never raises for
    anything the guest sends or for a vanished interface. `answered` and `ignored` count requests."""

    def __init__(self, interface: str, lease: Lease) -> None:
        self.interface = interface
        self.lease = lease
        self.answered = 0
        self.ignored = 0
        self.send_errors = 0
        self._declined = False
        # Protocol 0 receives nothing until bind(), so no frame slips in before the filter.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            sock.setblocking(False)
            _attach_filter(sock)
            sock.bind((interface, ETH_P_ALL))
            self.server_mac = _mac_text(sock.getsockname()[4])
        except OSError as exc:
            sock.close()
            raise DhcpError(
                f"cannot listen for DHCP on {interface}: {exc.strerror or exc}; "
                "the interface must exist in this network namespace and cocon needs root (CAP_NET_RAW)"
            ) from None
        if self.server_mac in ("", "00:00:00:00:00:00"):
            self.server_mac = DEFAULT_SERVER_MAC
        self._sock: socket.socket | None = sock
        self._buffer = bytearray(65536)

    def fileno(self) -> int:
        if self._sock is None:
            raise DhcpError(f"the DHCP responder on {self.interface} is closed: unregister it from the loop")
        return self._sock.fileno()

    def on_readable(self) -> None:
        """Read the pending frames (at most a few hundred per call) and answer them."""
        sock = self._sock
        if sock is None:
            return
        for _ in range(_MAX_FRAMES_PER_CALL):
            try:
                size, address = sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ENETDOWN once when the interface goes down or away
                log.debug("DHCP responder on %s: receive failed: %s", self.interface, exc)
                return
            if address[2] == PACKET_OUTGOING:
                continue
            self._answer(bytes(self._buffer[:size]))

    def _answer(self, frame: bytes) -> None:
        request = parse(frame)
        if request is None:
            self.ignored += 1
            return
        answer = reply(request, self.lease, server_mac=self.server_mac)
        if answer is None:
            self.ignored += 1
            if request.message_type == DECLINE and request.chaddr == self.lease.mac and not self._declined:
                self._declined = True
                log.warning(
                    "the guest on %s declined %s: another host on its network uses that address",
                    self.interface,
                    self.lease.address,
                )
            else:
                log.debug("DHCP: no answer to %s from %s", request.message_name, request.chaddr)
            return
        assert self._sock is not None
        try:
            self._sock.send(answer)
        except OSError as exc:  # a full queue (ENOBUFS, EAGAIN) or a link that is down: the client retries
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETDOWN, errno.ENXIO, errno.ENODEV):
                log.warning("DHCP responder on %s: cannot send a reply: %s", self.interface, exc)
            self.send_errors += 1
            return
        self.answered += 1
        kind = MESSAGE_NAMES.get(answer[14 + 20 + 8 + 240 + 2], "?")
        log.debug("DHCP: %s -> %s %s for %s", request.message_name, kind, self.lease.address, request.chaddr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DhcpResponder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
