"""`sdnode`: day-2 commands for a deployed fleet, over SSH, from the same inventory as the playbooks.

Exit status: 0 all good; 1 something is unhealthy, failed or differs; 2 the command could not run
(bad inventory, unreachable node where one was required, bad option).
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdnode.day2 import Day2Error
from sdnode.day2.bootstrap import bootstrap
from sdnode.day2.gateway import (
    BACKEND,
    GatewayClient,
    GatewayView,
    ServerView,
    gateway_view,
    node_servers,
    wait_idle,
)
from sdnode.day2.grid import make_grid
from sdnode.day2.inventory import (
    GATEWAY_GROUP,
    GROUP,
    Node,
    default_inventory,
    find_host,
    host_names,
    load_fleet,
    load_nodes,
)
from sdnode.day2.keys import fleet_key_path, generate_key_pair, read_public_key
from sdnode.day2.manifest import DEFAULT_IGNORE, diff_manifests
from sdnode.day2.metrics import fmt_number
from sdnode.day2.remote import NodeSession
from sdnode.day2.service import Instance, manifest_instances, node_api_key, node_status, read_manifest
from sdnode.day2.smoke import DEFAULT_PROMPT, DEFAULT_SEED, SmokeResult, generate, node_request
from sdnode.state import state_dir

EXIT_OK, EXIT_BAD, EXIT_ERROR = 0, 1, 2
T = TypeVar("T")
R = TypeVar("R")


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; logs are read wide.
    return Console(file=stream, highlight=False, width=None if stream.isatty() else 200)


def state() -> Path:
    try:
        return state_dir()
    except RuntimeError as exc:
        raise Day2Error(str(exc)) from None


def parallel(func: Callable[[T], R], items: Iterable[T], workers: int = 16) -> list[R]:
    """func over items in threads (nodes are independent; SSH round trips dominate), results in order."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(func, items))


# --------------------------------------------------------------------------------------------------
# keys


def cmd_keys(args: argparse.Namespace) -> int:
    private = fleet_key_path(state())
    public, line = generate_key_pair(private, force=args.force)
    print(f"private key: {private} (0600)")
    print(f"public key:  {public}")
    print(line)
    print(
        "next: `sdnode bootstrap HOST` on password-only nodes, or put the public key in the node's "
        f"authorized_keys; then set ansible_ssh_private_key_file: {private} in the inventory"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# bootstrap


def read_password(path: str | None, who: str) -> str:
    if path == "-":
        text = sys.stdin.readline()
    elif path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise Day2Error(f"--password-file {path}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        text = getpass.getpass(f"password for {who}: ")
    else:
        raise Day2Error(
            "no password: pass --password-file FILE (or - for stdin), or run on a terminal to be asked"
        )
    password = text.rstrip("\r\n")
    if not password:
        raise Day2Error("the password is empty")
    return password


def cmd_bootstrap(args: argparse.Namespace) -> int:
    private = Path(args.key).expanduser() if args.key else fleet_key_path(state())
    public_line = read_public_key(private)
    if not private.exists():
        raise Day2Error(f"no private key at {private}; create the fleet key with `sdnode keys`")
    node = find_host(args.inventory, args.host)
    if node is None:
        print(
            f"note: {args.host} is not in inventory {args.inventory}; taking it as an address",
            file=sys.stderr,
        )
        node = Node(name=args.host, address=args.host, user="root")
    node = dataclasses.replace(node, port=args.port or node.port, user=args.user or node.user)
    if args.known_hosts:
        node = dataclasses.replace(node, known_hosts=(Path(args.known_hosts).expanduser(),))
    accept_new = None
    if args.accept_new_host_key:
        accept_new = node.known_hosts[0] if node.known_hosts else Path("~/.ssh/known_hosts").expanduser()
    password = read_password(args.password_file, f"{node.user}@{node.address}")
    steps = bootstrap(node, password, private, public_line, accept_new=accept_new)
    changed = sum(step.changed for step in steps)
    print(
        f"{node.name}: bootstrapped ({changed} change{'s' if changed != 1 else ''}); "
        f"log in with: ssh -i {private} -p {node.port} {node.user}@{node.address}"
    )
    if node.key_file is not None and node.key_file != private:
        print(
            f"note: the inventory uses {node.key_file} for {node.name}; "
            f"set ansible_ssh_private_key_file: {private}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------
# status


def status_table(results: list[Any]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in (
        "NODE",
        "INST",
        "REACHABLE",
        "DRIVER",
        "GPUS",
        "SERVICE",
        "READY",
        "QUEUE",
        "IMAGES",
        "KEYS",
        "MODEL",
    ):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("INST", "GPUS", "QUEUE", "IMAGES") else "left"
        )

    def mark(ok: bool, text: str) -> str:
        return f"[green]{text}[/]" if ok else f"[bold red]{text}[/]"

    for r in results:
        gpus = "-" if r.gpus is None else str(r.gpus)
        if not r.reachable or not r.instances:
            table.add_row(
                r.node,
                "-",
                mark(r.reachable, "yes" if r.reachable else "no"),
                r.driver,
                gpus,
                mark(False, "-" if not r.reachable else "none"),
                "-",
                "-",
                "-",
                "-",
                "-",
            )
            continue
        for inst in r.instances:
            table.add_row(
                r.node,
                str(inst.instance),
                mark(True, "yes"),
                r.driver,
                gpus,
                mark(inst.service == "active", inst.service),
                mark(inst.ready == "yes", inst.ready),
                fmt_number(inst.queue_depth),
                fmt_number(inst.images),
                mark(inst.keys != "stale", inst.keys),
                inst.model,
            )
    return table


def cmd_hosts(args: argparse.Namespace) -> int:
    """The make targets run this first: a missing, unparsable or empty inventory stops them here."""
    # Names only: a host whose variables only Ansible can render (templates, vault) is still fine to deploy.
    print("\n".join(host_names(args.inventory, args.limit)))
    return EXIT_OK


def gateway_table(views: list[GatewayView], names: set[str]) -> Table:
    """Every server of backend sdserve at every gateway, for the nodes shown (`names`)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, title_justify="left")
    table.title = f"gateways: backend {BACKEND}"
    for column in ("GATEWAY", "SERVER", "STATE", "WEIGHT", "SESSIONS", "QUEUE", "CHECK", "WHY"):
        table.add_column(
            column,
            no_wrap=column != "WHY",
            justify="right" if column in ("WEIGHT", "SESSIONS", "QUEUE") else "left",
        )
    colour = {"UP": "green", "DRAIN": "yellow", "MAINT": "yellow", "NOLB": "yellow", "DOWN": "bold red"}
    for view in views:
        if view.error:
            table.add_row(view.gateway, "-", "[bold red]unreachable[/]", "-", "-", "-", "-", "see below")
            continue
        for s in view.servers:
            if s.node not in names:
                continue
            # UP with weight 0 (the agent's `up 0%`) takes no new requests: not green.
            shown = colour.get(s.state, "bold red") if s.in_rotation or s.state != "UP" else "yellow"
            table.add_row(
                s.gateway,
                s.server,
                f"[{shown}]{s.state}[/]",
                fmt_number(s.weight),
                fmt_number(s.sessions),
                fmt_number(s.queue),
                s.check or "-",
                s.why,
            )
    return table


def rotation(views: list[GatewayView], node: str) -> tuple[bool | None, list[dict[str, Any]]]:
    """(all of `node`'s servers in rotation at every gateway, None without gateways; its view at each)."""
    if not views:
        return None, []
    entries: list[dict[str, Any]] = []
    ok = True
    for view in views:
        if view.error:
            entries.append({"gateway": view.gateway, "error": view.error})
            ok = False
            continue
        servers = node_servers(view.servers, node)
        if not servers:
            entries.append({"gateway": view.gateway, "error": f"no server of {node} in backend {BACKEND}"})
            ok = False
        entries.extend(s.as_dict() for s in servers)
        ok = ok and all(s.in_rotation for s in servers)
    return ok, entries


def cmd_status(args: argparse.Namespace) -> int:
    nodes, gateways = load_fleet(args.inventory, args.limit)
    st = state()
    # Nodes and gateways at once: each is its own SSH connection.
    hosts = list(enumerate([*nodes, *gateways]))
    found = parallel(lambda h: node_status(h[1], st) if h[0] < len(nodes) else gateway_view(h[1]), hosts)
    results, views = found[: len(nodes)], found[len(nodes) :]
    unhealthy = [r for r in results if not r.healthy]
    in_rotation = {r.node: rotation(views, r.node) for r in results}
    out_of_rotation = [name for name, (ok, _) in in_rotation.items() if ok is False]
    failed = unhealthy or out_of_rotation
    if args.json:
        report = []
        for r in results:
            data = r.as_dict()
            data["in_rotation"], data["gateways"] = in_rotation[r.node]
            report.append(data)
        print(json.dumps(report, indent=2))
        return EXIT_BAD if failed else EXIT_OK
    out = console()
    out.print(status_table(results))
    for r in results:
        if r.error:
            out.print(f"[bold red]{r.node}[/]: {r.error}")
        for inst in r.instances:
            if inst.note:
                out.print(f"[yellow]{r.node} sdserve@{inst.instance}[/]: {inst.note}")
    healthy = len(results) - len(unhealthy)
    summary = f"{healthy}/{len(results)} node{'s' if len(results) != 1 else ''} healthy"
    out.print(
        f"[green]{summary}[/]"
        if not unhealthy
        else f"[bold red]{summary}[/]: {', '.join(r.node for r in unhealthy)}"
    )
    if views:
        show_gateways(out, views, results, out_of_rotation)
    return EXIT_BAD if failed else EXIT_OK


def show_gateways(
    out: Console, views: list[GatewayView], results: list[Any], out_of_rotation: list[str]
) -> None:
    names = {r.node for r in results}
    out.print()
    out.print(gateway_table(views, names))
    for view in views:
        if view.error:
            out.print(f"[bold red]{view.gateway}[/]: {view.error}")
            continue
        for name in sorted(names - {s.node for s in view.servers}):
            out.print(f"[bold red]{view.gateway}[/]: no server of {name} in backend {BACKEND}")
    where = f"{len(views)} gateway{'s' if len(views) != 1 else ''}"
    summary = (
        f"{len(names) - len(out_of_rotation)}/{len(names)} node{'s' if len(names) != 1 else ''} "
        f"in rotation at {where}"
    )
    out.print(
        f"[green]{summary}[/]"
        if not out_of_rotation
        else f"[bold red]{summary}[/]: {', '.join(out_of_rotation)}"
    )


# --------------------------------------------------------------------------------------------------
# drain / undrain


def server_list(servers: list[ServerView], limit: int = 8) -> str:
    names = [s.server for s in servers]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def admin_state(args: argparse.Namespace, state: str) -> int:
    """`set server sdserve/<NODE>_<i> state <state>` for each of NODE's servers at every gateway. Every
    gateway is read first: an unknown node, a gateway without its servers or out of reach stops the
    command before anything changes."""
    node = args.node
    if args.limit:
        raise Day2Error(f"{'drain' if state == 'drain' else 'undrain'} takes one NODE, not --limit")
    nodes, gateways = load_fleet(args.inventory)
    verb = "drain" if state == "drain" else "undrain"
    if node not in {n.name for n in nodes}:
        raise Day2Error(f"{node} is not a host of group {GROUP} in inventory {args.inventory}")
    if not gateways:
        raise Day2Error(
            f"no host in group {GATEWAY_GROUP} in inventory {args.inventory}: no gateway to {verb} {node} at"
        )

    def prepare(gateway: Node) -> tuple[Node, GatewayClient | None, list[ServerView], str]:
        try:
            session = NodeSession(gateway).open()
        except Day2Error as exc:
            return gateway, None, [], str(exc)
        client = GatewayClient(session)
        try:
            everyone = client.servers()
        except Day2Error as exc:
            session.close()
            return gateway, None, [], str(exc)
        servers = node_servers(everyone, node)
        if not servers:
            session.close()
            there = f"its servers: {server_list(everyone)}" if everyone else "it has none"
            return gateway, None, [], f"{gateway.name}: no server of {node} in backend {BACKEND} ({there})"
        return gateway, client, servers, ""

    prepared = parallel(prepare, gateways)
    try:
        errors = [error for *_, error in prepared if error]
        if errors:
            for error in errors:
                print(f"sdnode: error: {error}", file=sys.stderr)
            print(f"sdnode: {node}: nothing changed at any gateway", file=sys.stderr)
            return EXIT_ERROR

        def act(item: tuple[Node, GatewayClient | None, list[ServerView], str]) -> tuple[str, int]:
            gateway, client, before, _ = item
            assert client is not None
            try:
                client.set_state([s.server for s in before], state)
                if state == "drain" and args.wait:
                    after, waited, idle = wait_idle(client, node, args.timeout)
                else:
                    after, waited, idle = node_servers(client.servers(), node), 0.0, None
            except Day2Error as exc:
                return f"{exc}", EXIT_ERROR
            was = {s.server: s.state for s in before}
            moves = ", ".join(f"{s.server} {was.get(s.server, '?')} -> {s.state}" for s in after)
            sessions, queued = sum(s.sessions or 0 for s in after), sum(s.queue or 0 for s in after)
            load = f"{sessions} session{'s' if sessions != 1 else ''}, {queued} queued"
            if state == "ready":
                out = [s for s in after if not s.in_rotation]
                if out:
                    why = "; ".join(f"{s.server}: {s.why or s.status}" for s in out)
                    return f"{gateway.name}: {moves}; not in rotation: {why}", EXIT_BAD
                return f"{gateway.name}: {moves}; in rotation", EXIT_OK
            if idle is None:
                return f"{gateway.name}: {moves}; {load} now (not waiting)", EXIT_OK
            if idle:
                return (
                    f"{gateway.name}: {moves}; no sessions and nothing queued after {waited:.1f} s",
                    EXIT_OK,
                )
            return f"{gateway.name}: {moves}; still {load} after {waited:.1f} s (--timeout)", EXIT_BAD

        outcomes = parallel(act, prepared)
    finally:
        for _, client, *_ in prepared:
            if client is not None:
                client.session.close()
    for line, code in outcomes:
        if code == EXIT_ERROR:
            print(f"sdnode: error: {line}", file=sys.stderr)
        else:
            print(line)
    worst = max(code for _, code in outcomes)
    done = sum(code != EXIT_ERROR for _, code in outcomes)
    what = "drained" if state == "drain" else "set ready"
    print(f"{node}: {what} at {done}/{len(outcomes)} gateway{'s' if len(outcomes) != 1 else ''}")
    return worst


def cmd_drain(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise Day2Error("--timeout must be above 0 seconds")
    return admin_state(args, "drain")


def cmd_undrain(args: argparse.Namespace) -> int:
    return admin_state(args, "ready")


# --------------------------------------------------------------------------------------------------
# logs

RELATIVE_SINCE = re.compile(r"^\d+\s*(s|sec|m|min|h|hour|hours|d|day|days|w|week|weeks)$")


def journal_since(since: str) -> str:
    """`1h` -> `1h ago` (journalctl's relative form); anything else (a date, `today`) as given."""
    since = since.strip()
    return f"{since} ago" if RELATIVE_SINCE.match(since) else since


def journal_command(since: str) -> str:
    argv = [
        "journalctl",
        "--no-pager",
        "--quiet",
        "-o",
        "short-iso",
        "-u",
        "sdserve@*",
        "--since",
        journal_since(since),
    ]
    return shlex.join(argv)


def fetch_journal(node: Node, command: str) -> tuple[Node, list[str], str]:
    try:
        with NodeSession(node) as session:
            rc, out, err = session.run(command, sudo=True, timeout=300)
    except Day2Error as exc:
        return node, [], str(exc)
    if rc != 0 and "No data available" in err:
        return node, [], ""  # journalctl's answer when no unit matching sdserve@* ever logged
    if rc != 0:
        return node, [], f"{node.name}: journalctl failed (rc={rc}): {(err.strip().splitlines() or [''])[-1]}"
    return node, out.splitlines(), ""


def cmd_logs(args: argparse.Namespace) -> int:
    limit = args.limit
    if args.host:
        limit = f"{args.host}:&{limit}" if limit else args.host
    nodes = load_nodes(args.inventory, limit)
    if args.lines is not None and args.lines < 1:
        raise Day2Error("--lines must be at least 1")
    command = journal_command(args.since)
    failures = 0
    width = max(len(n.name) for n in nodes)
    for node, lines, error in parallel(lambda n: fetch_journal(n, command), nodes):
        if error:
            failures += 1
            print(f"sdnode: {error}", file=sys.stderr)
            continue
        if not lines:
            hidden = node.user != "root" and not node.become
            why = f"; {node.user} may not read the system journal: set ansible_become" if hidden else ""
            print(f"{node.name:<{width}} | (no sdserve entries since {args.since}{why})")
        # journalctl -n counts from --since forwards when both are given; the newest lines are wanted.
        for line in lines[-args.lines :] if args.lines else lines:
            print(f"{node.name:<{width}} | {line}")
    return EXIT_BAD if failures else EXIT_OK


# --------------------------------------------------------------------------------------------------
# smoke


def cmd_smoke(args: argparse.Namespace) -> int:
    nodes = load_nodes(args.inventory, args.limit)
    # Every node's request before any connection: a bad flag or sdnode_smoke_* stops the run here.
    bodies = {n.name: node_request(n, args.prompt, args.seed, args.size, args.steps) for n in nodes}
    st = state()
    out_dir = st / "smoke"
    out_dir.mkdir(parents=True, exist_ok=True)

    # Connect and read each node's instances first, so the progress bar knows the total.
    def prepare(node: Node) -> tuple[Node, NodeSession | None, list[Instance], str | None, str]:
        try:
            token = node_api_key(st, node)
            session = NodeSession(node).open()
        except Day2Error as exc:
            return node, None, [], None, str(exc)
        try:
            return node, session, manifest_instances(node.name, read_manifest(session)), token, ""
        except Day2Error as exc:
            session.close()
            return node, None, [], None, str(exc)

    prepared = parallel(prepare, nodes)
    results: list[SmokeResult] = []
    for node, session, _, _, error in prepared:
        if session is None:
            detail = error.removeprefix(f"{node.name}: ")
            results.append(SmokeResult(node.name, None, bodies[node.name]["seed"], False, 0.0, detail))
    jobs = [(session, i, token) for _, session, instances, token, _ in prepared if session for i in instances]
    tty = sys.stdout.isatty()
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max(1, min(64, len(jobs))))
    try:
        futures = [
            pool.submit(generate, s, i, t, bodies[s.node.name], out_dir, args.timeout) for s, i, t in jobs
        ]
        progress = Progress(
            TextColumn("smoke"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            disable=not tty,
        )
        with progress:
            task = progress.add_task("", total=len(futures))
            for done, future in enumerate(as_completed(futures), 1):
                result = future.result()
                results.append(result)
                line = (
                    f"{result.label} ok in {result.seconds:.1f}s -> {result.detail}"
                    if result.ok
                    else f"{result.label} FAILED after {result.seconds:.1f}s: {result.detail}"
                )
                progress.update(task, advance=1, description=result.label)
                if tty:
                    progress.console.print(
                        ("[green]" if result.ok else "[bold red]") + line + "[/]", highlight=False
                    )
                else:
                    print(f"[{done}/{len(futures)}] {line}", flush=True)
    finally:
        # Sessions first: on Ctrl-C that ends the workers' reads at once instead of after --timeout.
        for _, session, *_ in prepared:
            if session is not None:
                session.close()
        pool.shutdown(wait=True, cancel_futures=True)
    for r in results:
        if r.instance is None:
            print(f"{r.node} FAILED: {r.detail}")
    results.sort(key=lambda r: (r.node, -1 if r.instance is None else r.instance))
    ok = [r for r in results if r.ok]
    print(
        f"{len(ok)}/{len(results)} instance{'s' if len(results) != 1 else ''} generated in "
        f"{time.monotonic() - started:.1f}s; images in {out_dir}"
    )
    if results:
        # Only this run's results: the directory may hold images of nodes no longer in the inventory.
        grid = out_dir / "grid.png"
        make_grid([(r.caption(), r.image) for r in results]).save(grid)
        print(f"grid: {grid}")
    return EXIT_OK if results and len(ok) == len(results) else EXIT_BAD


# --------------------------------------------------------------------------------------------------
# diff-manifests


def load_cached_manifest(st: Path, node: Node) -> dict[str, Any]:
    path = st / "manifests" / f"{node.name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Day2Error(
            f"{node.name}: no cached manifest at {path} (the deploy fetches it; or drop --cached)"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise Day2Error(f"{node.name}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise Day2Error(f"{node.name}: {path} is not a JSON object")
    return data


def fetch_manifest(node: Node) -> dict[str, Any]:
    with NodeSession(node) as session:
        return read_manifest(session)


def load_saved_manifest(against: Path, node: str) -> dict[str, Any]:
    """A manifest saved before a rebuild: the file itself, or <dir>/<node>.json."""
    path = against / f"{node}.json" if against.is_dir() else against
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Day2Error(f"{node}: cannot read the saved manifest {path}: {exc}") from None
    if not isinstance(data, dict):
        raise Day2Error(f"{node}: {path} is not a JSON object")
    return data


def cmd_diff_manifests(args: argparse.Namespace) -> int:
    nodes = load_nodes(args.inventory, args.limit)
    st = state()

    def get(node: Node) -> tuple[str, dict[str, Any] | None, str]:
        try:
            data = load_cached_manifest(st, node) if args.cached else fetch_manifest(node)
            return node.name, data, ""
        except Day2Error as exc:
            return node.name, None, str(exc)

    fetched = parallel(get, nodes)
    errors = [error for _, data, error in fetched if data is None]
    # Either every node against the others, or (--against) each node against what it ran before.
    groups: list[dict[str, Any]] = []
    if args.against is None:
        groups.append({name: data for name, data, _ in fetched})
    else:
        for name, data, _ in fetched:
            try:
                groups.append({f"{name} (saved)": load_saved_manifest(args.against, name), name: data})
            except Day2Error as exc:
                errors.append(str(exc))
    if errors:
        for error in errors:
            print(f"sdnode: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    ignore = () if args.all else DEFAULT_IGNORE + tuple(args.ignore)
    diffs = [diff_manifests(group, ignore) for group in groups]
    source = "cached" if args.cached else "live"
    if args.json:
        report = [
            {
                "hosts": diff.hosts,
                "identical": diff.identical,
                "compared": diff.compared,
                "ignored": diff.ignored,
                "differences": {k: dict(zip(diff.hosts, v, strict=True)) for k, v in diff.rows},
            }
            for diff in diffs
        ]
        print(json.dumps(report[0] if args.against is None else report, indent=2))
        return EXIT_OK if all(d.identical for d in diffs) else EXIT_BAD
    out = console()
    for diff in diffs:
        show_diff(out, diff, source)
    return EXIT_OK if all(d.identical for d in diffs) else EXIT_BAD


def show_diff(out: Console, diff: Any, source: str) -> None:
    if len(diff.hosts) == 1:
        out.print(f"only one manifest ({diff.hosts[0]}, {source}); nothing to compare it with")
        return
    if diff.identical:
        out.print(
            f"[green]{len(diff.hosts)} manifests identical[/] ({', '.join(diff.hosts)}; {source}; "
            f"{diff.compared} keys compared, ignored: {', '.join(diff.ignored) or 'none'})"
        )
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("KEY", no_wrap=True)
    for host in diff.hosts:
        table.add_column(host, overflow="fold")
    for key, values in diff.rows:
        table.add_row(key, *values)
    out.print(table)
    out.print(
        f"[bold red]{len(diff.rows)} of {diff.compared} keys differ[/] "
        f"between {len(diff.hosts)} manifests ({', '.join(diff.hosts)}; {source})"
    )


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-i",
        "--inventory",
        default=default_inventory(),
        help="Ansible inventory (default: $SDNODE_INVENTORY or ./inventory)",
    )
    common.add_argument("--limit", metavar="PATTERN", help="Ansible host pattern to narrow the sdnodes group")

    parser = argparse.ArgumentParser(
        prog="sdnode",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 all good; 1 unhealthy, failed or different; 2 could not run",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "keys", parents=[common], help="generate the fleet's ed25519 SSH key pair in $STATE/keys"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an existing pair (nodes trusting it get locked out)"
    )
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "bootstrap",
        parents=[common],
        help="password-only node -> key-only: install the fleet key, prove it, turn passwords off",
    )
    p.add_argument("host", metavar="HOST", help="an inventory host or an address")
    p.add_argument("--user", help="login user (default: the inventory's ansible_user, else root)")
    p.add_argument("--port", type=int, help="SSH port (default: the inventory's, else 22)")
    p.add_argument(
        "--password-file", metavar="FILE", help="read the password from FILE (- for stdin); default: ask"
    )
    p.add_argument(
        "--key", metavar="PRIVATE_KEY", help="key pair to install (default: $STATE/keys/sdnode_ed25519)"
    )
    p.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="known_hosts to check the node against "
        "(default: the inventory's UserKnownHostsFile, else ~/.ssh/known_hosts)",
    )
    p.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="record an unknown host key (a changed one is still refused); check its fingerprint",
    )
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser(
        "hosts",
        parents=[common],
        help="the inventory's sdnodes hosts; an error when it is missing, unparsable or names none",
    )
    p.set_defaults(func=cmd_hosts)

    p = sub.add_parser(
        "status", parents=[common], help="per node and instance: reachable, driver, service, ready, figures"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "drain",
        parents=[common],
        help="take NODE out of rotation at every gateway (HAProxy state drain), then wait for its work",
    )
    p.add_argument("node", metavar="NODE", help="an inventory host of group sdnodes")
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once drained, without waiting for its sessions and queue to empty",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds to wait for no sessions and no queue at each gateway (default: 300; exit 1 past it)",
    )
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser(
        "undrain", parents=[common], help="put NODE back in rotation at every gateway (HAProxy state ready)"
    )
    p.add_argument("node", metavar="NODE", help="an inventory host of group sdnodes")
    p.set_defaults(func=cmd_undrain)

    p = sub.add_parser(
        "logs", parents=[common], help="the sdserve@* journal of one or all nodes, prefixed with the host"
    )
    p.add_argument("host", metavar="HOST", nargs="?", help="one inventory host (or pattern); default: all")
    p.add_argument("--since", default="1h", help="how far back: 30min, 1h, 2d, or a date (default: 1h)")
    p.add_argument("-n", "--lines", type=int, help="at most this many lines per node (the newest)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "smoke",
        parents=[common],
        help="one generation on every instance at once; images and a grid (defaults: sdnode_smoke_*)",
    )
    p.add_argument("--prompt", help=f"default: sdnode_smoke_prompt, else {DEFAULT_PROMPT!r}")
    p.add_argument("--seed", type=int, help=f"default: sdnode_smoke_seed, else {DEFAULT_SEED}")
    p.add_argument(
        "--size",
        help="WxH, e.g. 512x512 (default: sdnode_smoke_width x sdnode_smoke_height, else the model's own)",
    )
    p.add_argument(
        "--steps", type=int, help="denoising steps (default: sdnode_smoke_steps, else the service's)"
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for each image (default: 600)")
    p.set_defaults(func=cmd_smoke)

    p = sub.add_parser("diff-manifests", parents=[common], help="what differs between the nodes' manifests")
    p.add_argument(
        "--cached", action="store_true", help="compare $STATE/manifests/<host>.json, fetched by the deploy"
    )
    p.add_argument(
        "--ignore", action="append", default=[], metavar="GLOB", help="also ignore keys matching GLOB"
    )
    p.add_argument("--all", action="store_true", help="compare every key, even time stamps and host names")
    p.add_argument(
        "--against",
        type=Path,
        metavar="PATH",
        help="compare each node with a manifest saved before (a file, or a directory of <host>.json): "
        "show that a rebuilt node runs exactly what it ran",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_diff_manifests)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Paramiko logs transport failures with tracebacks; the one-line errors below say it better.
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Day2Error as exc:
        if os.environ.get("SDNODE_DEBUG") == "1":
            raise
        print(f"sdnode: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("sdnode: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
