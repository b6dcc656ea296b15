"""cocon's virtual network: bridges, veth and tap endpoints, IPAM, nftables firewall, DNS.

The engine uses `NetworkStack` (see docs/network.md); the modules below it are usable alone:
`ipam` (addresses over SQLite), `links` (netlink via pyroute2), `firewall` (nftables JSON),
`dns` (the embedded resolver). Importing this package costs nothing: the names below are loaded
on first use (the engine is on `cocon run`'s hot path).
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cocon.network.errors import (
        AddressInUse,
        InvalidNetworkRequest,
        NetworkConflict,
        NetworkError,
        NetworkNotFound,
        PortInUse,
        SubnetFull,
    )
    from cocon.network.firewall import PortMapping, parse_port_mapping
    from cocon.network.links import create_netns, delete_netns
    from cocon.network.stack import DEFAULT_NETWORK, Endpoint, Network, NetworkSpec, NetworkStack, Subnet

_WHERE = {
    "AddressInUse": "errors",
    "InvalidNetworkRequest": "errors",
    "NetworkConflict": "errors",
    "NetworkError": "errors",
    "NetworkNotFound": "errors",
    "PortInUse": "errors",
    "SubnetFull": "errors",
    "PortMapping": "firewall",
    "parse_port_mapping": "firewall",
    "create_netns": "links",
    "delete_netns": "links",
    "DEFAULT_NETWORK": "stack",
    "Endpoint": "stack",
    "Network": "stack",
    "NetworkSpec": "stack",
    "NetworkStack": "stack",
    "Subnet": "stack",
}

__all__ = [
    "DEFAULT_NETWORK",
    "AddressInUse",
    "Endpoint",
    "InvalidNetworkRequest",
    "Network",
    "NetworkConflict",
    "NetworkError",
    "NetworkNotFound",
    "NetworkSpec",
    "NetworkStack",
    "PortInUse",
    "PortMapping",
    "Subnet",
    "SubnetFull",
    "create_netns",
    "delete_netns",
    "parse_port_mapping",
]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cocon.network' has no attribute {name!r}")
    mod = __import__(f"cocon.network.{module}", fromlist=[name])
    return getattr(mod, name)
