"""The `testnode` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from sdnode.state import state_dir
from sdnode.testnode.checkout import ssh_base_args
from sdnode.testnode.gc import gc
from sdnode.testnode.hostsetup import host_setup
from sdnode.testnode.images import DEFAULT_OS, OS_IMAGES
from sdnode.testnode.inventory import write_inventory
from sdnode.testnode.lifecycle import down, find_own_node, list_nodes, up
from sdnode.testnode.processes import TestnodeError
from sdnode.testnode.records import load_records
from sdnode.testnode.supervisor import supervise


def parse_memory(value: str) -> int:
    """'512M', '2G', '1.5GiB', '1073741824' -> bytes (binary units, as systemd reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
    if not match:
        raise TestnodeError(f"--memory: cannot read {value!r}; use a size such as 512M or 2G")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1024 ** " KMGT".index(unit or " "))
    if size < 128 * 1024**2:
        raise TestnodeError(f"--memory: {value!r} is below 128M, too little for systemd and sshd")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testnode",
        description="Throwaway Debian 12 and Ubuntu test nodes "
        "(systemd-nspawn) that Ansible and testinfra can deploy to.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="start a node (idempotent) and print its address")
    p.add_argument("name")
    p.add_argument(
        "--password-login",
        action="store_true",
        help="give root a random password ($STATE/testnodes/NAME.password), allowed over SSH",
    )
    p.add_argument("--memory", type=parse_memory, help="memory limit, e.g. 2G")
    p.add_argument("--os", default=DEFAULT_OS, choices=sorted(OS_IMAGES), help=f"default {DEFAULT_OS}")
    p = sub.add_parser("down", help="stop nodes and remove everything they made")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?")
    target.add_argument("--all", action="store_true", help="every node of this checkout")
    p = sub.add_parser("list", help="list the nodes on this host")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("ssh", help="ssh into a node as root, optionally running a command")
    p.add_argument("name")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("inventory", help="write the Ansible inventory of this checkout's nodes")
    p.add_argument("--output", type=Path, help="hosts.yml to write (default: $STATE/testnodes/inventory/)")
    p.add_argument("--group-vars", type=Path, help="link this directory as group_vars beside the inventory")
    sub.add_parser("gc", help="remove what killed runs left behind (live nodes are kept)")
    sub.add_parser("host-setup", help="install the host packages test nodes need (root)")
    p = sub.add_parser("_supervise")  # internal: the per-node supervisor
    p.add_argument("name")
    p.add_argument("memory_bytes", type=int, help="0: no limit")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    if args.command != "_supervise":
        # Killed politely (CI timeouts, pytest-timeout): unwind, so an `up` half-way cleans after itself.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _dispatch(args)
    except TestnodeError as exc:
        print(f"testnode: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a state directory this user may not write
        print(f"testnode: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        record = up(
            args.name,
            password_login=args.password_login,
            memory=args.memory,
            os_name=args.os,
            log=lambda msg: print(msg, file=sys.stderr),
        )
        print(record.address)
    elif args.command == "down":
        base = state_dir()
        if args.all:
            mine = [r for r in load_records() if r.state_dir == str(base)]
            for record in mine:
                down(record.name)
            if not mine:
                print(f"no nodes of {base}")
        else:
            down(args.name)
    elif args.command == "list":
        nodes = list_nodes(state_dir())
        if args.json:
            print(json.dumps(nodes, indent=2))
        else:
            print(f"{'NAME':<20} {'ADDRESS':<14} {'STATUS':<9} {'OS':<13} {'LOGIN':<9} STATE")
            for n in nodes:
                login = "password" if n["password_login"] else "key"
                print(
                    f"{n['name']:<20} {n['address']:<14} {n['status']:<9} {n['os']:<13} {login:<9} "
                    f"{'this checkout' if n['mine'] else n['state_dir']}"
                )
    elif args.command == "ssh":
        base = state_dir()
        record = find_own_node(args.name, base)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        # Interactive sessions may prompt (e.g. a passphrase); commands never should.
        os.execvp("ssh", [*ssh_base_args(base, record.address, batch=bool(cmd)), *cmd])
    elif args.command == "inventory":
        print(write_inventory(state_dir(), args.output, args.group_vars))
    elif args.command == "gc":
        gc()
    elif args.command == "host-setup":
        host_setup()
    elif args.command == "_supervise":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return supervise(args.name, argv, args.memory_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
