"""Errors of the `network` layer. Each message says what is wrong and what to do about it.

`status` follows the engine's convention (Docker's HTTP statuses): 400 bad request, 404 no such
object, 409 conflict with the current state, 500 anything else.
"""

from __future__ import annotations


class NetworkError(Exception):
    """Base of every error the network layer raises."""

    status = 500


class InvalidNetworkRequest(NetworkError):
    """A bad subnet, gateway, address, port mapping or name."""

    status = 400


class NetworkNotFound(NetworkError):
    """No such network or endpoint."""

    status = 404


class NetworkConflict(NetworkError):
    """The request conflicts with what exists: a name taken, a network in use, an overlapping subnet."""

    status = 409


class SubnetFull(NetworkConflict):
    """Every address of the subnet (or of its range) is handed out."""


class AddressInUse(NetworkConflict):
    """A fixed address (--ip) that another instance holds."""


class PortInUse(NetworkConflict):
    """A host port to publish that a process on the host or another instance already uses."""
