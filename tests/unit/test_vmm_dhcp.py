"""cocon.vmm.dhcp without a network: hand-built client frames in, replies decoded by hand out."""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass

import pytest

from cocon.vmm import dhcp
from cocon.vmm.dhcp import DhcpError, DhcpResponder, Lease, encode_search_list, parse, reply

GUEST_MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:ab:cd:ef"
SERVER_MAC = "02:00:00:00:00:42"


def lease(**changes: object) -> Lease:
    values: dict[str, object] = {
        "mac": GUEST_MAC,
        "address": "10.88.0.5/16",
        "gateway": "10.88.0.1",
        "dns": ["10.88.0.1", "192.0.2.53"],
        "search": ["eng.example.com", "example.com"],
        "hostname": "web-1",
        "mtu": 1400,
        "lease_seconds": 3600,
    }
    values.update(changes)
    return Lease(**values)  # type: ignore[arg-type]


# --- building client frames by hand ------------------------------------------------------------


def inet_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def client_frame(
    message_type: int | None = dhcp.DISCOVER,
    *,
    chaddr: str = GUEST_MAC,
    src_mac: str | None = None,
    dst_ip: str = "255.255.255.255",
    src_ip: str = "0.0.0.0",
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    flags: int = 0,
    xid: int = 0x1234ABCD,
    options: list[tuple[int, bytes]] | None = None,
    raw_options: bytes | None = None,
    file_field: bytes = b"",
    op: int = 1,
    sport: int = 68,
    dport: int = 67,
    cookie: bytes = b"\x63\x82\x53\x63",
    frag: int = 0,
    ethertype: int = 0x0800,
) -> bytes:
    opts = bytearray()
    if message_type is not None:
        opts += bytes((53, 1, message_type))
    for code, value in options or []:
        opts += bytes((code, len(value))) + value
    opts += b"\xff"
    if raw_options is not None:
        opts = bytearray(raw_options)
    bootp = (
        struct.pack("!BBBBIHH", op, 1, 6, 0, xid, 3, flags)
        + socket.inet_aton(ciaddr)
        + bytes(4)
        + bytes(4)
        + socket.inet_aton(giaddr)
        + mac(chaddr)
        + bytes(10)
        + bytes(64)
        + file_field.ljust(128, b"\0")
        + cookie
        + bytes(opts)
    )
    udp = struct.pack("!HHHH", sport, dport, 8 + len(bootp), 0) + bootp
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            7,
            frag,
            64,
            17,
            0,
            socket.inet_aton(src_ip),
            socket.inet_aton(dst_ip),
        )
    )
    ip[10:12] = struct.pack("!H", ~inet_sum(bytes(ip)) & 0xFFFF)
    return b"\xff" * 6 + mac(src_mac or chaddr) + struct.pack("!H", ethertype) + bytes(ip) + udp


# --- decoding replies by hand ------------------------------------------------------------------


@dataclass
class Decoded:
    dst_mac: str
    src_mac: str
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    chaddr: str
    bootp_length: int
    ip_length: int
    options: dict[int, bytes]
    instances: dict[int, int]
    order: list[int]

    @property
    def type(self) -> int:
        return self.options[53][0]


def decode(frame: bytes) -> Decoded:
    """An independent decoder that also checks the IPv4 and UDP checksums."""
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert ip[0] == 0x45
    total = struct.unpack("!H", ip[2:4])[0]
    assert total == len(ip), "the IP total length covers the whole frame"
    assert inet_sum(ip[:20]) == 0xFFFF, "IPv4 header checksum"
    assert ip[9] == 17
    udp = ip[20:total]
    sport, dport, length, checksum = struct.unpack("!HHHH", udp[:8])
    assert length == len(udp)
    assert checksum != 0
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, length)
    assert inet_sum(pseudo + udp) == 0xFFFF, "UDP checksum"
    bootp = udp[8:]
    assert bootp[236:240] == b"\x63\x82\x53\x63"
    options: dict[int, bytes] = {}
    instances: dict[int, int] = {}
    order: list[int] = []
    i = 240
    while True:
        code = bootp[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        n = bootp[i + 1]
        options[code] = options.get(code, b"") + bootp[i + 2 : i + 2 + n]
        instances[code] = instances.get(code, 0) + 1
        order.append(code)
        i += 2 + n
    assert all(b == 0 for b in bootp[i + 1 :]), "only padding after END"
    return Decoded(
        dst_mac=frame[0:6].hex(":"),
        src_mac=frame[6:12].hex(":"),
        src_ip=socket.inet_ntoa(ip[12:16]),
        dst_ip=socket.inet_ntoa(ip[16:20]),
        sport=sport,
        dport=dport,
        op=bootp[0],
        xid=struct.unpack("!I", bootp[4:8])[0],
        flags=struct.unpack("!H", bootp[10:12])[0],
        ciaddr=socket.inet_ntoa(bootp[12:16]),
        yiaddr=socket.inet_ntoa(bootp[16:20]),
        chaddr=bootp[28:34].hex(":"),
        bootp_length=len(bootp),
        ip_length=total,
        options=options,
        instances=instances,
        order=order,
    )


def decode_names(data: bytes) -> list[str]:
    """RFC 1035 names with compression pointers, as a client reads option 119."""
    names = []
    i = 0
    while i < len(data):
        labels: list[str] = []
        j, jumped = i, False
        while True:
            n = data[j]
            if n & 0xC0 == 0xC0:
                if not jumped:
                    i = j + 2
                j, jumped = ((n & 0x3F) << 8) | data[j + 1], True
                continue
            if n == 0:
                if not jumped:
                    i = j + 1
                break
            labels.append(data[j + 1 : j + 1 + n].decode())
            j += 1 + n
        names.append(".".join(labels))
    return names


def answer(frame: bytes, the_lease: Lease | None = None) -> Decoded | None:
    request = parse(frame)
    assert request is not None
    out = reply(request, the_lease or lease(), server_mac=SERVER_MAC)
    return decode(out) if out is not None else None


# --- parse -------------------------------------------------------------------------------------


def test_parse_reads_a_discover() -> None:
    frame = client_frame(
        options=[
            (55, bytes((1, 3, 6, 15, 119))),
            (12, b"guest"),
            (57, b"\x05\xdc"),
            (61, b"\x01" + mac(GUEST_MAC)),
        ],
        flags=0x8000,
    )
    request = parse(frame)
    assert request is not None
    assert request.message_type == dhcp.DISCOVER and request.message_name == "DHCPDISCOVER"
    assert request.chaddr == GUEST_MAC and request.src_mac == GUEST_MAC
    assert request.dst_mac == "ff:ff:ff:ff:ff:ff"
    assert (request.src_ip, request.dst_ip) == ("0.0.0.0", "255.255.255.255")
    assert request.xid == 0x1234ABCD and request.secs == 3 and request.broadcast
    assert request.parameter_requests == (1, 3, 6, 15, 119)
    assert request.hostname == "guest"
    assert request.max_message_size == 1500
    assert request.client_id == b"\x01" + mac(GUEST_MAC)
    assert request.requested_address is None and request.server_id is None


def test_parse_reads_request_fields_split_options_and_overload() -> None:
    # option 55 in two instances (RFC 3396), option 50 and 54 in the `file` field (overload = 1)
    file_field = (
        bytes((50, 4)) + socket.inet_aton("10.88.0.5") + bytes((54, 4)) + socket.inet_aton("10.88.0.1")
    )
    frame = client_frame(
        dhcp.REQUEST,
        options=[(55, b"\x01\x03"), (52, b"\x01"), (55, b"\x06")],
        file_field=file_field + b"\xff",
    )
    request = parse(frame)
    assert request is not None
    assert request.parameter_requests == (1, 3, 6)
    assert request.requested_address == "10.88.0.5"
    assert request.server_id == "10.88.0.1"


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(client_frame(ethertype=0x86DD), id="not-ipv4"),
        pytest.param(client_frame(sport=67), id="from-a-server-port"),
        pytest.param(client_frame(dport=68), id="to-a-client-port"),
        pytest.param(client_frame(op=2), id="bootreply"),
        pytest.param(client_frame(cookie=b"\0\0\0\0"), id="bootp-without-cookie"),
        pytest.param(client_frame(None), id="no-message-type"),
        pytest.param(client_frame(raw_options=bytes((53, 1, 1, 12, 40, 65))), id="option-past-the-end"),
        pytest.param(
            client_frame(options=[(52, b"\x01")], file_field=b"\x0c\xc8"), id="bad-overloaded-option"
        ),
        pytest.param(client_frame(options=[(52, b"\x07")]), id="bad-overload-value"),
        pytest.param(client_frame(frag=0x2000), id="first-fragment"),
        pytest.param(client_frame(frag=0x0010), id="later-fragment"),
        pytest.param(client_frame()[:200], id="truncated"),
        pytest.param(b"", id="empty"),
    ],
)
def test_parse_ignores_what_is_not_a_dhcp_request(frame: bytes) -> None:
    assert parse(frame) is None


def test_parse_rejects_bad_ip_headers() -> None:
    good = bytearray(client_frame())
    bad_checksum = bytearray(good)
    bad_checksum[14 + 10] ^= 0xFF
    assert parse(bytes(bad_checksum)) is None
    short_ihl = bytearray(good)
    short_ihl[14] = 0x44
    assert parse(bytes(short_ihl)) is None
    long_total = bytearray(good)
    long_total[16:18] = struct.pack("!H", len(good))  # longer than the frame
    assert parse(bytes(long_total)) is None
    not_udp = bytearray(good)
    not_udp[14 + 9] = 6
    assert parse(bytes(not_udp)) is None


def test_parse_never_raises_on_garbage() -> None:
    rng = random.Random(20261125)
    seeds = [
        client_frame(),
        client_frame(dhcp.REQUEST, options=[(50, socket.inet_aton("10.88.0.5")), (54, b"\x0a\x58\x00\x01")]),
        client_frame(options=[(52, b"\x03")], file_field=b"\x0c\x02hi\xff"),
    ]
    the_lease = lease()
    started = time.monotonic()
    parsed = 0
    for i in range(30000):
        kind = i % 4
        if kind == 0:
            frame = rng.randbytes(rng.randrange(0, 700))
        else:
            frame_b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 8)):
                position = rng.randrange(len(frame_b))
                if kind == 1:
                    frame_b[position] = rng.randrange(256)
                elif kind == 2 and position > 14 + 20 + 8 + 240:  # options only: keep the headers valid
                    frame_b[position] = rng.choice((0, 1, 50, 52, 53, 54, 55, 61, 255, rng.randrange(256)))
                else:
                    del frame_b[position:]
                    break
            frame = bytes(frame_b)
        request = parse(frame)
        if request is not None:
            parsed += 1
            out = reply(request, the_lease, server_mac=SERVER_MAC)
            if out is not None:
                decode(out)
    assert parsed > 1000, "the mutations kept enough frames valid to exercise reply()"
    assert time.monotonic() - started < 20


def test_parse_is_linear_in_the_frame_size() -> None:
    # 21 000 one-byte instances of one option in a 63 KB datagram: joined once, not 21 000 times
    frame = client_frame(raw_options=bytes((53, 1, 1)) + bytes((12, 1, 65)) * 21000 + b"\xff")
    started = time.monotonic()
    request = parse(frame)
    assert request is not None and request.hostname == "A" * 21000
    assert time.monotonic() - started < 1


# --- reply -------------------------------------------------------------------------------------


def test_discover_gets_an_offer_with_every_option() -> None:
    out = answer(client_frame(options=[(61, b"\x01" + mac(GUEST_MAC))]))
    assert out is not None
    assert out.type == dhcp.OFFER and out.order[0] == 53
    assert out.op == 2 and out.xid == 0x1234ABCD and out.chaddr == GUEST_MAC
    # no broadcast flag, no ciaddr: unicast to the client's MAC and the offered address
    assert out.dst_mac == GUEST_MAC and out.dst_ip == "10.88.0.5"
    assert out.src_mac == SERVER_MAC and out.src_ip == "10.88.0.1"
    assert (out.sport, out.dport) == (67, 68)
    assert out.yiaddr == "10.88.0.5" and out.ciaddr == "0.0.0.0"
    o = out.options
    assert o[54] == socket.inet_aton("10.88.0.1")
    assert struct.unpack("!I", o[51])[0] == 3600
    assert struct.unpack("!I", o[58])[0] == 1800
    assert struct.unpack("!I", o[59])[0] == 3150
    assert o[1] == socket.inet_aton("255.255.0.0")
    assert o[3] == socket.inet_aton("10.88.0.1")
    assert o[6] == socket.inet_aton("10.88.0.1") + socket.inet_aton("192.0.2.53")
    assert o[15] == b"eng.example.com"
    assert decode_names(o[119]) == ["eng.example.com", "example.com"]
    assert o[12] == b"web-1"
    assert struct.unpack("!H", o[26])[0] == 1400
    assert o[61] == b"\x01" + mac(GUEST_MAC), "the client identifier is echoed (RFC 6842)"
    assert out.bootp_length >= 300


def test_broadcast_flag_gets_a_broadcast_reply() -> None:
    out = answer(client_frame(flags=0x8000))
    assert out is not None and out.type == dhcp.OFFER
    assert out.dst_mac == "ff:ff:ff:ff:ff:ff" and out.dst_ip == "255.255.255.255"
    assert out.flags == 0x8000


def test_request_selecting_our_offer_is_acked_and_another_address_naked() -> None:
    ours = [(50, socket.inet_aton("10.88.0.5")), (54, socket.inet_aton("10.88.0.1"))]
    ack = answer(client_frame(dhcp.REQUEST, options=ours))
    assert ack is not None and ack.type == dhcp.ACK
    assert ack.yiaddr == "10.88.0.5" and ack.dst_ip == "10.88.0.5" and 51 in ack.options

    other = [(50, socket.inet_aton("10.88.0.99")), (54, socket.inet_aton("10.88.0.1"))]
    nak = answer(client_frame(dhcp.REQUEST, options=other))
    assert nak is not None and nak.type == dhcp.NAK
    assert nak.dst_mac == "ff:ff:ff:ff:ff:ff" and nak.dst_ip == "255.255.255.255"
    assert nak.yiaddr == "0.0.0.0" and nak.ciaddr == "0.0.0.0"
    assert nak.options[54] == socket.inet_aton("10.88.0.1")
    assert set(nak.options) == {53, 54, 56}, "a NAK carries no configuration"


def test_request_selecting_another_server_is_not_answered() -> None:
    other_server = [(50, socket.inet_aton("10.88.0.5")), (54, socket.inet_aton("10.88.0.2"))]
    request = parse(client_frame(dhcp.REQUEST, options=other_server))
    assert request is not None
    assert reply(request, lease()) is None


def test_init_reboot_request() -> None:
    ack = answer(client_frame(dhcp.REQUEST, options=[(50, socket.inet_aton("10.88.0.5"))]))
    assert ack is not None and ack.type == dhcp.ACK
    nak = answer(client_frame(dhcp.REQUEST, options=[(50, socket.inet_aton("192.168.1.7"))]))
    assert nak is not None and nak.type == dhcp.NAK and nak.dst_ip == "255.255.255.255"


def test_renewing_request_is_acked_by_unicast_to_ciaddr() -> None:
    frame = client_frame(dhcp.REQUEST, ciaddr="10.88.0.5", src_ip="10.88.0.5", dst_ip="10.88.0.1")
    out = answer(frame)
    assert out is not None and out.type == dhcp.ACK
    assert out.ciaddr == "10.88.0.5" and out.yiaddr == "10.88.0.5"
    assert out.dst_ip == "10.88.0.5" and out.dst_mac == GUEST_MAC
    # rebinding: broadcast, the client's address is still unicast-reachable
    rebind = answer(client_frame(dhcp.REQUEST, ciaddr="10.88.0.5", src_ip="10.88.0.5"))
    assert rebind is not None and rebind.type == dhcp.ACK and rebind.dst_ip == "10.88.0.5"
    # renewing an address that is not the lease's
    nak = answer(client_frame(dhcp.REQUEST, ciaddr="10.88.0.77", src_ip="10.88.0.77"))
    assert nak is not None and nak.type == dhcp.NAK and nak.dst_ip == "255.255.255.255"


def test_request_without_address_is_not_answered() -> None:
    request = parse(client_frame(dhcp.REQUEST))
    assert request is not None and reply(request, lease()) is None


def test_inform_gets_configuration_without_lease_times() -> None:
    out = answer(client_frame(dhcp.INFORM, ciaddr="10.88.0.5", src_ip="10.88.0.5"))
    assert out is not None and out.type == dhcp.ACK
    assert out.yiaddr == "0.0.0.0" and out.ciaddr == "10.88.0.5" and out.dst_ip == "10.88.0.5"
    assert not {51, 58, 59} & set(out.options)
    assert out.options[3] == socket.inet_aton("10.88.0.1")


@pytest.mark.parametrize("message_type", [dhcp.RELEASE, dhcp.DECLINE, dhcp.OFFER, dhcp.ACK, dhcp.NAK, 99])
def test_other_messages_get_no_reply(message_type: int) -> None:
    request = parse(client_frame(message_type, ciaddr="10.88.0.5"))
    assert request is not None and reply(request, lease()) is None


def test_only_the_lease_mac_is_answered() -> None:
    for frame in (
        client_frame(chaddr=OTHER_MAC),
        client_frame(chaddr=GUEST_MAC, src_mac=OTHER_MAC),
        client_frame(chaddr=OTHER_MAC, src_mac=GUEST_MAC),
    ):
        request = parse(frame)
        assert request is not None and reply(request, lease()) is None
    # the lease's MAC may be written in any case or with dashes
    request = parse(client_frame())
    assert request is not None
    assert reply(request, lease(mac="52-54-00-12-34-56".upper())) is not None


def test_relayed_requests_and_requests_for_other_servers_are_not_answered() -> None:
    for frame in (
        client_frame(giaddr="10.1.0.1"),
        client_frame(dhcp.REQUEST, ciaddr="10.88.0.5", src_ip="10.88.0.5", dst_ip="10.88.0.9"),
    ):
        request = parse(frame)
        assert request is not None and reply(request, lease()) is None
    # the subnet's broadcast address is a broadcast too
    assert answer(client_frame(dst_ip="10.88.255.255")) is not None


def test_minimal_lease_sends_only_what_it_has() -> None:
    out = answer(client_frame(), Lease(mac=GUEST_MAC, address="192.168.7.20/24"))
    assert out is not None
    assert set(out.options) == {53, 54, 51, 58, 59, 1}
    assert out.src_ip == "192.168.7.1" and out.options[54] == socket.inet_aton("192.168.7.1")
    assert out.options[1] == socket.inet_aton("255.255.255.0")


def test_infinite_lease() -> None:
    out = answer(client_frame(), lease(lease_seconds=0xFFFFFFFF))
    assert out is not None
    assert out.options[51] == out.options[58] == out.options[59] == b"\xff\xff\xff\xff"


def test_search_list_encoding_matches_rfc_3397() -> None:
    # the example of RFC 3397 section 2
    assert encode_search_list(["eng.apple.com", "marketing.apple.com"]) == (
        b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04"
    )
    assert encode_search_list(["a.example", "A.Example."]) == b"\x01a\x07example\x00\xc0\x00"
    assert decode_names(encode_search_list(["x.y", "z", "y"])) == ["x.y", "z", "y"]


def test_long_options_are_split_or_dropped_to_fit_the_client() -> None:
    search = [f"zone{i}.department{i}.example.internal" for i in range(20)]
    big = lease(search=search)
    # a client that takes 1500-byte messages gets the whole list, in several option 119 instances
    out = answer(client_frame(options=[(57, struct.pack("!H", 1500))]), big)
    assert out is not None
    assert out.instances[119] >= 2
    assert decode_names(out.options[119]) == search
    assert out.ip_length <= 1500
    # a client that did not say takes 576 bytes: the search list goes, the essentials stay
    small = answer(client_frame(), big)
    assert small is not None
    assert small.ip_length <= 576
    assert 119 not in small.options
    assert {53, 54, 51, 1, 3, 6} <= set(small.options)


# --- Lease -------------------------------------------------------------------------------------


def test_lease_normalizes_and_picks_a_server_id() -> None:
    a = Lease(mac="52:54:00:AB:CD:EF", address="10.0.0.9/24", dns=[], search=["example.com."])
    assert a.mac == "52:54:00:ab:cd:ef"
    assert a.search == ["example.com"]
    assert a.server_id == "10.0.0.1", "no gateway: the network's first host"
    assert Lease(mac=GUEST_MAC, address="10.0.0.1/24").server_id == "10.0.0.254", (
        "the first host is the guest"
    )
    assert Lease(mac=GUEST_MAC, address="10.0.0.9/24", gateway="10.0.0.2").server_id == "10.0.0.2"
    assert Lease(mac=GUEST_MAC, address="10.0.0.9/24", server_id="10.0.0.3").server_id == "10.0.0.3"
    assert Lease(mac=GUEST_MAC, address="10.0.0.8/31").server_id == "10.0.0.9"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mac": "52:54:00:12:34"}, "not a unicast Ethernet address"),
        ({"mac": "01:00:5e:00:00:01"}, "not a unicast Ethernet address"),
        ({"address": "10.88.0.5"}, "no prefix length"),
        ({"address": "10.88.0.300/16"}, "not an IPv4 address"),
        ({"address": "10.88.0.0/16"}, "network address"),
        ({"address": "10.88.255.255/16"}, "broadcast address"),
        ({"address": "10.88.0.5/32", "gateway": None}, "no address for the DHCP server"),
        ({"gateway": "10.88.0.5"}, "the guest's own address"),
        ({"dns": ["fd00::1"]}, "IPv4 addresses only"),
        ({"search": ["bad domain"]}, "not a DNS name"),
        ({"hostname": "-x" + "a" * 70}, "not a DNS name"),
        ({"mtu": 40}, "MTU"),
        ({"lease_seconds": 0}, "lease time"),
        ({"server_id": "10.88.0.5"}, "the guest's own address"),
    ],
)
def test_lease_rejects_what_cannot_be_served(changes: dict[str, object], message: str) -> None:
    with pytest.raises(DhcpError, match=message):
        lease(**changes)


# --- the responder object ----------------------------------------------------------------------


def test_responder_on_a_missing_interface_says_so() -> None:
    with pytest.raises(DhcpError, match="cannot listen for DHCP on cocon-nosuch0"):
        DhcpResponder("cocon-nosuch0", lease())


def test_responder_close_is_idempotent_and_stops_reading() -> None:
    responder = DhcpResponder("lo", lease())
    assert responder.fileno() >= 0
    responder.on_readable()  # nothing pending: returns at once
    responder.close()
    responder.close()
    responder.on_readable()
    with pytest.raises(DhcpError, match="closed"):
        responder.fileno()
