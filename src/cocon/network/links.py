"""Links through netlink (pyroute2): bridges, veth pairs into network namespaces, taps for VMs.

Network namespaces are named by a path: a bind mount of a `nsfs` file, as `ip netns add` makes
under /run/netns, but at a path the engine chooses (`create_netns` / `delete_netns`). To configure
links inside one, a netlink socket is opened by a short-lived thread that has `setns`-ed into it: a
socket stays in the namespace it was created in, whichever thread uses it later (no process is
forked, unlike pyroute2's `NetNS`).

Names: the default network's bridge is `cocon0`, others `cn-<first 12 hex digits of the network id>`
(15 characters, the kernel's limit). Host ends of veth pairs are `vc<10 hex>`, taps `tc<10 hex>`,
both derived from the endpoint so that a restart finds them again.

IPv6 addresses are added with IFA_F_NODAD: a fresh namespace would otherwise hold them "tentative"
for a second or two, and the subnet is cocon's own.
"""

from __future__ import annotations

import errno
import ipaddress
import os

from cocon import _linux
from cocon._typing import TYPE_CHECKING
from cocon.network.errors import NetworkConflict, NetworkError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from types import TracebackType

    from pyroute2 import IPRoute

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IFA_F_NODAD = 0x02
IFNAMSIZ = 15
DEFAULT_MTU = 1500


def _ipr() -> IPRoute:
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error(exc: BaseException, what: str) -> NetworkError:
    code = getattr(exc, "code", None)
    if code == errno.EEXIST:
        return NetworkConflict(
            f"{what}: a link with that name exists already; remove it or pick another name"
        )
    return NetworkError(f"{what}: {exc}; check that cocon runs as root with CAP_NET_ADMIN")


def short_name(prefix: str, key: str) -> str:
    """`prefix` + hex digits of sha256(key), IFNAMSIZ (15) characters at most."""
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()
    return (prefix + digest)[: min(IFNAMSIZ, len(prefix) + 10)]


def mac_for(address: IPAddress | None, key: str) -> str:
    """A locally administered unicast MAC: 02:42 + the IPv4 address (as Docker), else from `key`."""
    if isinstance(address, ipaddress.IPv4Address):
        tail = address.packed
    else:
        import hashlib

        tail = hashlib.sha256(key.encode()).digest()[:4]
    return ":".join(f"{b:02x}" for b in b"\x02\x42" + tail)


# --- network namespaces -----------------------------------------------------------------------
def create_netns(path: str) -> None:
    """A new, persistent network namespace bound at `path` (a file is created there), with `lo` up."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, 0o755, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    os.close(fd)

    def work() -> None:
        _linux.unshare(_linux.CLONE_NEWNET)
        _linux.mount("/proc/thread-self/ns/net", path, None, _linux.MS_BIND)

    error = _in_thread(work, "cocon-netns")
    if error is not None:
        os.unlink(path)
        raise NetworkError(f"cannot create a network namespace at {path}: {error}; cocon needs root")
    try:
        setup_loopback(path)
    except BaseException:
        delete_netns(path)
        raise


def delete_netns(path: str) -> None:
    """Unbind and remove the namespace file at `path` (the namespace goes when nothing else holds it)."""
    try:
        _linux.umount2(path, _linux.MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"cannot unmount the network namespace {path}: {exc}") from None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _in_thread(fn: Callable[[], None], name: str) -> BaseException | None:
    """Run `fn` in a short-lived thread (namespace changes stay in it); its exception, if any."""
    import threading

    error: list[BaseException] = []

    def work() -> None:
        try:
            fn()
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=work, name=name)
    thread.start()
    thread.join()
    return error[0] if error else None


class in_netns:
    """A netlink socket in the namespace bound at `path` (None: this process's namespace)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.ipr: IPRoute | None = None

    def __enter__(self) -> IPRoute:
        path = self.path
        if path is None:
            self.ipr = _ipr()
            return self.ipr
        result: list[IPRoute] = []

        def work() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _linux.setns(fd, _linux.CLONE_NEWNET)
            finally:
                os.close(fd)
            result.append(_ipr())

        error = _in_thread(work, "cocon-setns")
        if error is not None:
            raise NetworkError(f"cannot enter the network namespace {path}: {error}; check that it exists")
        self.ipr = result[0]
        return self.ipr

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.ipr is not None:
            self.ipr.close()
            self.ipr = None


def setup_loopback(netns_path: str | None) -> None:
    with in_netns(netns_path) as ipr:
        idx = ipr.link_lookup(ifname="lo")
        if idx:
            ipr.link("set", index=idx[0], state="up")


# --- links ------------------------------------------------------------------------------------
def link_index(name: str, netns_path: str | None = None) -> int | None:
    with in_netns(netns_path) as ipr:
        found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def link_exists(name: str, netns_path: str | None = None) -> bool:
    return link_index(name, netns_path) is not None


def delete_link(name: str, netns_path: str | None = None) -> bool:
    """Delete the link `name`; False if there is none. A veth's peer goes with it."""
    with in_netns(netns_path) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except Exception as exc:
            if getattr(exc, "code", None) == errno.ENODEV:
                return False
            raise _netlink_error(exc, f"cannot delete link {name}") from None
    return True


def _add_addresses(ipr: IPRoute, index: int, addresses: Sequence[IPInterface]) -> None:
    present = {(a.get_attr("IFA_ADDRESS"), int(a["prefixlen"])) for a in ipr.get_addr(index=index)}
    for iface in addresses:
        if (str(iface.ip), iface.network.prefixlen) in present:
            continue
        kwargs: dict[str, object] = {}
        if iface.version == 6:
            kwargs["flags"] = IFA_F_NODAD
        else:
            kwargs["broadcast"] = str(iface.network.broadcast_address)
        try:
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen, **kwargs)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.EEXIST:
                raise _netlink_error(exc, f"cannot add address {iface}") from None


def write_sysctl(path: str, value: str) -> None:
    """Write `value` to /proc/sys/`path` (e.g. 'net/ipv4/ip_forward') unless it is already set."""
    full = "/proc/sys/" + path
    try:
        with open(full) as f:
            if f.read().strip() == value:
                return
        with open(full, "w") as f:
            f.write(value)
    except OSError as exc:
        raise NetworkError(f"cannot set sysctl {path}={value}: {exc}; cocon needs root") from None


def ensure_bridge(name: str, addresses: Sequence[IPInterface], *, mtu: int = DEFAULT_MTU) -> int:
    """The bridge `name`, created if missing, with `addresses` (the gateways) and up. Idempotent."""
    if len(name) > IFNAMSIZ:
        raise NetworkError(f"bridge name {name!r} is longer than {IFNAMSIZ} characters")
    with in_netns(None) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            try:
                # a fixed MAC: otherwise the bridge takes its lowest port's, and it changes (and the
                # instances' ARP entries for the gateway go stale) whenever that port goes
                ipr.link("add", ifname=name, kind="bridge", mtu=mtu, address=mac_for(None, "bridge/" + name))
            except Exception as exc:
                raise _netlink_error(exc, f"cannot create bridge {name}") from None
            found = ipr.link_lookup(ifname=name)
        index = found[0]
        if any(a.version == 6 for a in addresses):
            # the bridge only forwards: no router advertisements taken, no SLAAC on it
            write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0")
        _add_addresses(ipr, index, addresses)
        ipr.link("set", index=index, state="up")
    return index


def create_veth(
    bridge: str,
    host_ifname: str,
    netns_path: str,
    *,
    ifname: str = "eth0",
    addresses: Sequence[IPInterface] = (),
    gateways: Sequence[IPAddress] = (),
    mac: str | None = None,
    mtu: int = DEFAULT_MTU,
) -> str:
    """A veth pair: `host_ifname` on `bridge`, its peer moved into the namespace at `netns_path` as
    `ifname` with `addresses`, default routes via `gateways` (one per family) and `lo` up. Returns
    the MAC address of the namespace end. Nothing is left behind on failure."""
    tmp_peer = "vp" + host_ifname[2:]  # renamed to `ifname` once in the namespace
    with in_netns(None) as ipr:
        master = ipr.link_lookup(ifname=bridge)
        if not master:
            raise NetworkError(f"bridge {bridge} does not exist: create the network first")
        try:
            ipr.link("add", ifname=host_ifname, kind="veth", peer={"ifname": tmp_peer}, mtu=mtu)
        except Exception as exc:
            raise _netlink_error(exc, f"cannot create veth pair {host_ifname}") from None
        try:
            host_idx = ipr.link_lookup(ifname=host_ifname)[0]
            peer_idx = ipr.link_lookup(ifname=tmp_peer)[0]
            ipr.link("set", index=peer_idx, mtu=mtu)
            if mac is not None:
                ipr.link("set", index=peer_idx, address=mac)
            ipr.link("set", index=host_idx, master=master[0], state="up")
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ipr.link("set", index=peer_idx, net_ns_fd=fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            delete_link(host_ifname)
            if isinstance(exc, NetworkError):
                raise
            raise _netlink_error(exc, f"cannot set up veth pair {host_ifname}") from None
    try:
        with in_netns(netns_path) as nsr:
            idx = nsr.link_lookup(ifname=tmp_peer)[0]
            nsr.link("set", index=idx, ifname=ifname)
            _add_addresses(nsr, idx, addresses)
            nsr.link("set", index=idx, state="up")
            lo = nsr.link_lookup(ifname="lo")
            if lo:
                nsr.link("set", index=lo[0], state="up")
            for gw in gateways:
                try:
                    nsr.route(
                        "add",
                        dst="default" if gw.version == 4 else "::/0",
                        gateway=str(gw),
                        oif=idx,
                        family=10 if gw.version == 6 else 2,
                    )
                except Exception as exc:
                    if getattr(exc, "code", None) != errno.EEXIST:
                        raise
            got = nsr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
    except BaseException as exc:
        delete_link(host_ifname)
        if isinstance(exc, NetworkError):
            raise
        raise _netlink_error(exc, f"cannot configure {ifname} in {netns_path}") from None
    return str(got)


def create_tap(bridge: str, name: str, *, mtu: int = DEFAULT_MTU, uid: int | None = None) -> int:
    """A persistent tap device `name` (IFF_TAP|IFF_NO_PI) on `bridge`, up, for QEMU's
    `-netdev tap,ifname=NAME,script=no,downscript=no`. Returns its index."""
    with in_netns(None) as ipr:
        master = ipr.link_lookup(ifname=bridge)
        if not master:
            raise NetworkError(f"bridge {bridge} does not exist: create the network first")
        kwargs: dict[str, object] = {"ifname": name, "kind": "tuntap", "mode": "tap"}
        if uid is not None:
            kwargs["uid"] = uid
        try:
            ipr.link("add", **kwargs)
        except Exception as exc:
            raise _netlink_error(exc, f"cannot create tap {name}") from None
        try:
            idx = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=idx, mtu=mtu)
            ipr.link("set", index=idx, master=master[0], state="up")
        except BaseException as exc:
            delete_link(name)
            raise _netlink_error(exc, f"cannot attach tap {name} to {bridge}") from None
    return idx
