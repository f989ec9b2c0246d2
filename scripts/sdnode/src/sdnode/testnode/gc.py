"""`testnode gc`: remove what killed runs left behind, never touching live nodes."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from sdnode.testnode.checkout import key_path
from sdnode.testnode.fileops import RM_TREE
from sdnode.testnode.lifecycle import (
    forget_in_state,
    kill_node_processes,
    remove_node_resources,
    stop_processes,
)
from sdnode.testnode.names import NAME_RE, NETNS_PREFIX, VETH_PREFIX, veth_name
from sdnode.testnode.network import (
    BRIDGE,
    NFT_TABLE,
    netns_list,
    remove_node_network,
    shared_network_present,
    teardown_shared_network,
)
from sdnode.testnode.noderoot import discard_tree, trash_being_deleted, trash_dir, unmount_node
from sdnode.testnode.processes import Log, kill_quietly, require_root, run
from sdnode.testnode.records import host_lock, load_records, nodes_dir
from sdnode.testnode.rootfs import gc_cache
from sdnode.testnode.supervisor import (
    CGROUP_PREFIX,
    NSPAWN_PROPAGATE,
    memory_cgroup,
    node_processes,
    remove_cgroup,
)


def gc(log: Log = print) -> list[str]:
    require_root("gc")
    removed: list[str] = []
    with host_lock():
        records = load_records()
        live = {r.name for r in records if r.is_live()}
        # Live nodes whose checkout's state (and so their key) is gone can never be reached again.
        for record in records:
            if record.name in live and not key_path(Path(record.state_dir)).exists():
                stop_processes(record)
                live.discard(record.name)
                removed.append(f"orphaned node {record.name} (state {record.state_dir} is gone)")
        dead = [r for r in records if r.name not in live]
        for record in dead:
            remove_node_resources(record.name, record.address, record.cgroup)
            removed.append(f"node {record.name} ({record.address})")
        for pid, node in node_processes().items():
            if node not in live:
                kill_quietly(pid)
                removed.append(f"process {pid} ({node})")
        for ns in netns_list():
            if ns.startswith(NETNS_PREFIX) and ns[len(NETNS_PREFIX) :] not in live:
                remove_node_network(ns[len(NETNS_PREFIX) :], None)
                removed.append(f"netns {ns}")
        live_veths = {veth_name(r.address) for r in records if r.name in live}
        links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
        for link in links:
            ifname = link.get("ifname", "")
            if re.fullmatch(rf"{VETH_PREFIX}\d+", ifname) and ifname not in live_veths:
                run(["ip", "link", "delete", ifname], check=False)
                removed.append(f"link {ifname}")
        base = nodes_dir()
        if base.is_dir():
            for entry in sorted(base.iterdir()):
                if entry.is_dir() and not entry.name.startswith(".") and entry.name not in live:
                    kill_node_processes(entry.name)
                    unmount_node(entry.name)
                    discard_tree(entry)
                    removed.append(f"node dir {entry}")
        removed += gc_cache()
        if NSPAWN_PROPAGATE.is_dir():
            for entry in NSPAWN_PROPAGATE.iterdir():
                if entry.name not in live and NAME_RE.fullmatch(entry.name):
                    with contextlib.suppress(OSError):  # only empty ones: nspawn's, not in use
                        entry.rmdir()
                        removed.append(f"nspawn leftover {entry}")
        if trash_dir().is_dir():
            busy = trash_being_deleted()
            for entry in sorted(trash_dir().iterdir()):
                if entry not in busy:  # a background deletion that was killed
                    run([*RM_TREE, entry], check=False)
                    removed.append(f"trash {entry}")
        group = memory_cgroup("x")
        if group is not None and group.parent.is_dir():
            for stale in group.parent.glob(f"{CGROUP_PREFIX}*"):
                if stale.name.removeprefix(CGROUP_PREFIX) not in live:
                    remove_cgroup(stale)
                    removed.append(f"cgroup {stale}")
        if not live:
            had_shared = shared_network_present()
            teardown_shared_network()
            if had_shared:
                removed.append(f"bridge {BRIDGE}, table inet {NFT_TABLE}, ip_forward restored")
    for record in dead:
        forget_in_state(record)
    for item in removed:
        log(f"removed {item}")
    if not removed:
        log("nothing to clean")
    return removed
