"""CIDR helpers for the base role, on the standard library's ipaddress (no netaddr on the controller)."""

from __future__ import annotations

import ipaddress


def _network(value):
    return ipaddress.ip_network(str(value).strip(), strict=False)


def sdnode_invalid_networks(values):
    """The entries of a list that are not IPv4/IPv6 addresses or CIDR networks."""
    bad = []
    for value in values or []:
        try:
            _network(value)
        except ValueError:
            bad.append(value)
    return bad


def sdnode_networks_by_family(values, family):
    """Normalised networks of one family (4 or 6), for nft set elements."""
    return [str(n) for n in (_network(v) for v in values or []) if n.version == int(family)]


def sdnode_address_in_networks(address, values):
    """True when an address lies in any of the networks."""
    try:
        ip = ipaddress.ip_address(str(address).strip())
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return any(ip in _network(v) for v in values or [] if _network(v).version == ip.version)


class FilterModule:
    def filters(self):
        return {
            "sdnode_invalid_networks": sdnode_invalid_networks,
            "sdnode_networks_by_family": sdnode_networks_by_family,
            "sdnode_address_in_networks": sdnode_address_in_networks,
        }
