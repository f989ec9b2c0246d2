"""Node names and the names and addresses derived from them: hostnames, network namespaces, veths, MACs."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from sdnode.testnode.processes import TestnodeError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
NETWORK = ipaddress.IPv4Network("10.213.0.0/24")
GATEWAY = ipaddress.IPv4Address("10.213.0.1")
FIRST_NODE_HOST = 10
NETNS_PREFIX = "sdn-"
VETH_PREFIX = "sdnv"  # host end: sdnv<last octet>; the node end is eth0 inside the namespace


def validate_name(name: str) -> str:
    """Node names become hostnames, machine names and netns names: keep them short DNS labels."""
    if not NAME_RE.fullmatch(name) or "--" in name:
        raise TestnodeError(
            f"node name {name!r}: use 1-32 lowercase letters, digits and single hyphens, "
            "starting with a letter and not ending with a hyphen"
        )
    return name


def allocate_address(used: Iterable[str]) -> str:
    """The lowest free node address, from 10.213.0.10 up."""
    taken = {ipaddress.IPv4Address(a) for a in used}
    for host in range(FIRST_NODE_HOST, NETWORK.num_addresses - 1):
        candidate = NETWORK.network_address + host
        if candidate not in taken:
            return str(candidate)
    raise TestnodeError(f"no free address left in {NETWORK}: bring some nodes down")


def netns_name(name: str) -> str:
    return f"{NETNS_PREFIX}{name}"


def mac_address(address: str) -> str:
    """A fixed, locally administered MAC per address: when an address is reused by a new node, the ARP
    caches of the host and the other nodes stay right (a stale entry would blackhole it for ~30 s)."""
    octets = ipaddress.IPv4Address(address).packed
    return "02:53:44:4e:{:02x}:{:02x}".format(*octets[2:])


def veth_name(address: str) -> str:
    """Host end of a node's veth pair; interface names are limited to 15 characters, addresses are short."""
    return f"{VETH_PREFIX}{address.rsplit('.', 1)[1]}"
