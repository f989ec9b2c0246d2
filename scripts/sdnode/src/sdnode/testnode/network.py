"""Host networking: the shared bridge, NAT table and ip_forward, and each node's namespace and veth pair."""

from __future__ import annotations

import json
from pathlib import Path

from sdnode.testnode.fileops import write_file
from sdnode.testnode.names import GATEWAY, NETWORK, mac_address, netns_name, veth_name
from sdnode.testnode.processes import TestnodeError, kill_quietly, run
from sdnode.testnode.records import nodes_dir

BRIDGE = "sdnbr0"
NFT_TABLE = "sdnode_testnodes"  # family inet


def uplink_interface() -> str:
    routes = json.loads(run(["ip", "-j", "route", "show", "default"]).stdout or "[]")
    for route in routes:
        if route.get("dev"):
            return str(route["dev"])
    raise TestnodeError("no default route on the host: nodes would have no way out")


def nft_ruleset(uplink: str) -> str:
    """The whole table, replaced atomically (declare, delete, re-create in one transaction)."""
    return f"""table inet {NFT_TABLE} {{}}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {NETWORK} oifname "{uplink}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{BRIDGE}" accept
        oifname "{BRIDGE}" ct state established,related accept
    }}
}}
"""


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def ip_forward_path() -> Path:
    return Path("/proc/sys/net/ipv4/ip_forward")


def ip_forward_saved() -> Path:
    return nodes_dir() / "ip_forward.orig"


def setup_shared_network() -> None:
    """Bridge, NAT table, ip_forward (recording its old value once). Call under host_lock."""
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    # A bridge takes the lowest MAC of its ports unless given one: nodes coming and going would change
    # the gateway's MAC under the other nodes' ARP caches.
    if mac_address(str(GATEWAY)) not in run(["ip", "link", "show", "dev", BRIDGE]).stdout:
        run(["ip", "link", "set", "dev", BRIDGE, "address", mac_address(str(GATEWAY))])
    current = run(["ip", "-j", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f'"{GATEWAY}"' not in current:
        run(["ip", "addr", "add", f"{GATEWAY}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    run(["nft", "-f", "-"], input=nft_ruleset(uplink_interface()))
    saved = ip_forward_saved()
    if not saved.exists():
        write_file(saved, ip_forward_path().read_text())
    ip_forward_path().write_text("1\n")


def nft_table_exists() -> bool:
    return run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0


def shared_network_present() -> bool:
    """Whether any part of what setup_shared_network makes is there."""
    return link_exists(BRIDGE) or ip_forward_saved().exists() or nft_table_exists()


def teardown_shared_network() -> None:
    """Undo setup_shared_network. Call under host_lock, only when no live node remains."""
    if nft_table_exists():
        run(["nft", "delete", "table", "inet", NFT_TABLE])
    if link_exists(BRIDGE):
        run(["ip", "link", "delete", BRIDGE])
    saved = ip_forward_saved()
    if saved.exists():
        ip_forward_path().write_text(saved.read_text())
        saved.unlink()


def netns_list() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def setup_node_network(name: str, address: str) -> None:
    ns, veth = netns_name(name), veth_name(address)
    remove_node_network(name, address)  # leftovers of a killed run under the same name or address
    run(["ip", "netns", "add", ns])
    run(
        [
            "ip",
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            mac_address(address),
            "netns",
            ns,
        ]
    )
    run(["ip", "neigh", "flush", "to", address, "dev", BRIDGE], check=False)
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", str(GATEWAY)])


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split()]


def remove_node_network(name: str, address: str | None) -> None:
    ns = netns_name(name)
    if ns in netns_list():
        for pid in netns_pids(ns):
            kill_quietly(pid)
        run(["ip", "netns", "delete", ns])  # takes the veth pair with it
    # The kernel destroys a deleted namespace (and the veth pair with it) asynchronously.
    if address and link_exists(veth_name(address)):
        result = run(["ip", "link", "delete", veth_name(address)], check=False)
        if result.returncode != 0 and link_exists(veth_name(address)):
            raise TestnodeError(f"cannot delete link {veth_name(address)}: {result.stderr.strip()}")
