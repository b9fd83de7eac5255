"""Network interfaces of this machine (or of the network namespace the process runs in).

gloo (and NCCL's socket transport) pick the address they advertise to their peers from the
hostname; on machines where the hostname resolves to a loopback address (the default on many
images, and on the local Ray/SLURM clusters of this project) a rank then advertises 127.0.0.1
and its peers on other hosts get "Connection refused".  Pointing ``GLOO_SOCKET_IFNAME`` (or
``NCCL_SOCKET_IFNAME``) at the interface that holds the node's address fixes it; this module
finds that interface.
"""

from __future__ import annotations

import ipaddress
import socket

import psutil

__all__ = ["NoInterfaceError", "interface_for_address"]


class NoInterfaceError(LookupError):
    """No network interface of this machine holds the address asked for."""


def interface_for_address(ip: str) -> str:
    """Name of the network interface that holds the IPv4 or IPv6 address ``ip`` (e.g. ``eth0``).

    Reads the interfaces with ``psutil.net_if_addrs()``, so it sees those of the network namespace
    the calling process lives in.  Raises ValueError for a string that is not an address and
    NoInterfaceError, listing every interface and its addresses, when none holds it."""
    try:
        wanted = ipaddress.ip_address(ip.strip())
    except ValueError as exc:
        raise ValueError(f"interface_for_address: {ip!r} is not an IP address") from exc
    seen: list[str] = []
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        held = []
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                # IPv6 link-local addresses come with a zone ("fe80::1%eth0").
                value = ipaddress.ip_address(addr.address.split("%", 1)[0])
            except ValueError:
                continue
            if value == wanted:
                return name
            held.append(str(value))
        seen.append(f"{name} ({', '.join(held) or 'no IP address'})")
    raise NoInterfaceError(
        f"no network interface holds the address {ip}; the interfaces here are: "
        f"{'; '.join(seen) or 'none'}"
    )
