"""The gateways' view of the fleet: HAProxy's runtime API on each gateway's admin socket, reached over
SSH. The gateway has no socat, so its own python3 (stdlib only) talks to the unix socket as root; what
HAProxy answers comes back as JSON. Servers of backend `sdserve` are named `<inventory_hostname>_<index>`
by the gateway role, from what each node recorded; sdnode reads them from `show stat`, never re-derives
them."""

from __future__ import annotations

import csv
import errno
import json
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from sdnode.day2 import Day2Error
from sdnode.day2.inventory import Node
from sdnode.day2.remote import NodeSession, node_python

BACKEND = "sdserve"
ADMIN_SOCKET = "/run/haproxy/admin.sock"
SOCKET_TIMEOUT_S = 10.0
POLL_S = 1.0  # between two `show stat` while a drain waits for the node's work to finish

# Run on the gateway with the socket's path as its argument and the commands as JSON on stdin: each
# command on its own connection (HAProxy answers one command per connection in non-interactive mode,
# then closes), the answers back as JSON on stdout.
_GATEWAY_CLI = """
import errno, json, socket, sys
r = json.loads(sys.stdin.buffer.read())
answers = []
for command in r["commands"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(r["timeout"])
    chunks = []
    try:
        s.connect(sys.argv[1])
        s.sendall(command.encode() + b"\\n")
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    except socket.timeout:
        json.dump({"error": "ETIMEDOUT", "command": command, "answers": answers}, sys.stdout)
        sys.exit(0)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e))
        json.dump({"error": name, "detail": str(e), "command": command, "answers": answers}, sys.stdout)
        sys.exit(0)
    finally:
        s.close()
    answers.append(b"".join(chunks).decode("utf-8", "replace"))
json.dump({"answers": answers}, sys.stdout)
"""


def socket_error(gateway: Node, name: str, detail: str = "") -> str:
    """Why the admin socket could not be used, and what to look at (errno `name` as the gateway saw it)."""
    where = f"{gateway.name}: HAProxy's admin socket {ADMIN_SOCKET}"
    if name in (errno.errorcode[errno.EACCES], errno.errorcode[errno.EPERM]):
        hint = (
            "; set ansible_become: true for this host (the socket is root's)"
            if gateway.user != "root" and not gateway.become
            else ""
        )
        return f"{where}: permission denied{hint}"
    if name == errno.errorcode[errno.ENOENT]:
        return f"{where} does not exist: is HAProxy running with the gateway's configuration?"
    if name == errno.errorcode[errno.ECONNREFUSED]:
        return f"{where} refuses connections: HAProxy is not running"
    if name == "ETIMEDOUT":
        return f"{where} did not answer within {SOCKET_TIMEOUT_S:.0f} s"
    return f"{where}: {detail or name}"


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """`show stat` CSV as rows keyed by its own header (`# pxname,svname,...`): columns by name, never
    by position, so HAProxy versions that add columns read the same. ValueError if it is not that CSV."""
    lines = text.splitlines()
    header = lines[0][2:].split(",") if lines and lines[0].startswith("# ") else []
    if not {"pxname", "svname", "status"} <= set(header):
        first = lines[0][:80] if lines else "nothing"
        raise ValueError(f"not `show stat` CSV (it begins with {first!r})")
    return [
        dict(zip(header, values, strict=False))
        for values in csv.reader(line for line in lines[1:] if line.strip())
    ]


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def split_server(name: str) -> tuple[str, int | None]:
    """(inventory host, instance index) from a server name `<host>_<index>` (host names may hold `_`)."""
    host, sep, index = name.rpartition("_")
    if sep and index.isdigit():
        return host, int(index)
    return name, None


STEP = re.compile(r"^(UP|DOWN|NOLB|DRAIN) (\d+)/(\d+)$")


def classify(status: str, weight: int | None, check: str) -> tuple[str, str]:
    """(state, why) of a server from HAProxy's status text: UP, DRAIN, MAINT, DOWN or NOLB, and who put
    it there. HAProxy writes `DRAIN (agent)` for any drained server that has an agent check: the drain
    is the admin state (the operator's or the rolling deploy's); the service's agent only ever answers
    `up N%` or `down` (fleet contract), and its `up 0%` shows as UP with weight 0."""
    status = status.strip()
    step = STEP.match(status)
    if status.startswith("MAINT"):
        via = status[len("MAINT") :].strip(" ()")
        if via == "resolution":
            return "MAINT", "maintenance: its address does not resolve"
        return "MAINT", f"maintenance, inherited ({via})" if via else "maintenance, set by the operator"
    if status.startswith("DRAIN"):
        return "DRAIN", "drained by the operator (admin state)"
    if status == "DOWN (agent)":
        return "DOWN", "down by the service's agent (instance not ready)"
    if status.startswith("DOWN"):
        if step:
            return "DOWN", f"coming up: {step[2]} of {step[3]} health checks passed"
        return "DOWN", f"down by health check ({check})" if check else "down"
    if status.startswith("NOLB"):
        return "NOLB", "stopping: takes no new sessions"
    if weight == 0:
        return "UP", "weight 0 from the service's agent (instance draining or its queue full)"
    if step:
        return "UP", f"failing health checks ({check})" if check else "failing health checks"
    return "UP", ""


@dataclass
class ServerView:
    """One server of backend sdserve as one gateway sees it."""

    gateway: str
    server: str  # <inventory_hostname>_<index>
    node: str
    instance: int | None
    status: str  # HAProxy's own words (UP, DRAIN (agent), DOWN 1/2, MAINT (via b/s)...)
    state: str  # UP, DRAIN, MAINT, DOWN or NOLB
    why: str  # who or what put it there; empty when it serves normally
    weight: int | None
    sessions: int | None  # scur
    queue: int | None  # qcur
    check: str  # last health check: status and code (L7OK 200, L7STS 503, L4CON...)
    check_desc: str = ""  # HAProxy's words for it (last_chk)
    agent: str = ""  # the agent's last answer as HAProxy recorded it (last_agt)

    @property
    def in_rotation(self) -> bool:
        """Takes new requests: UP with a weight (not drained, down, in maintenance or weighted 0)."""
        return self.state == "UP" and (self.weight is None or self.weight > 0)

    @property
    def idle(self) -> bool:
        return not self.sessions and not self.queue

    def as_dict(self) -> dict:
        data = asdict(self)
        data["in_rotation"] = self.in_rotation
        return data


def server_views(gateway: str, rows: Sequence[dict[str, str]], backend: str = BACKEND) -> list[ServerView]:
    views = []
    for row in rows:
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        node, index = split_server(row["svname"])
        weight = _int(row.get("weight"))
        check = " ".join(part for part in (row.get("check_status", ""), row.get("check_code", "")) if part)
        state, why = classify(row.get("status", ""), weight, check)
        views.append(
            ServerView(
                gateway=gateway,
                server=row["svname"],
                node=node,
                instance=index,
                status=row.get("status", ""),
                state=state,
                why=why,
                weight=weight,
                sessions=_int(row.get("scur")),
                queue=_int(row.get("qcur")),
                check=check,
                check_desc=row.get("last_chk", ""),
                agent=row.get("last_agt", ""),
            )
        )
    return views


class GatewayClient:
    """HAProxy's runtime API on one gateway, over an open SSH session to it."""

    def __init__(self, session: NodeSession) -> None:
        self.session = session
        self.gateway = session.node

    def commands(self, commands: list[str]) -> list[str]:
        """HAProxy's answer to each command, in order; Day2Error when the socket cannot be used."""
        request = {"commands": commands, "timeout": SOCKET_TIMEOUT_S}
        argv = [node_python(self.gateway), "-c", _GATEWAY_CLI, ADMIN_SOCKET]
        command = self.gateway.sudo(shlex.join(argv))
        rc, out, err = self.session.run_with_input(
            command, json.dumps(request).encode(), timeout=SOCKET_TIMEOUT_S * len(commands) + 30
        )
        try:
            answer = json.loads(out)
        except json.JSONDecodeError:
            detail = (err.strip().splitlines() or [f"rc={rc}"])[-1]
            raise Day2Error(f"{self.gateway.name}: cannot run the gateway's python3: {detail}") from None
        if "error" in answer:
            raise Day2Error(socket_error(self.gateway, answer["error"], answer.get("detail", "")))
        return answer["answers"]

    def servers(self) -> list[ServerView]:
        """Every server of backend sdserve, as `show stat` has it now."""
        [text] = self.commands(["show stat"])
        try:
            return server_views(self.gateway.name, parse_show_stat(text))
        except ValueError as exc:
            raise Day2Error(f"{self.gateway.name}: `show stat` on {ADMIN_SOCKET}: {exc}") from None

    def set_state(self, servers: Sequence[str], state: str) -> None:
        """`set server sdserve/<server> state <state>` for each; HAProxy answers nothing when it took it."""
        commands = [f"set server {BACKEND}/{server} state {state}" for server in servers]
        for command, answer in zip(commands, self.commands(commands), strict=True):
            if answer.strip():
                raise Day2Error(f"{self.gateway.name}: HAProxy refused `{command}`: {answer.strip()}")


@dataclass
class GatewayView:
    """What `sdnode status` shows of one gateway: its sdserve servers, or why it could not be read."""

    gateway: str
    servers: list[ServerView] = field(default_factory=list)
    error: str = ""


def gateway_view(gateway: Node) -> GatewayView:
    try:
        with NodeSession(gateway) as session:
            return GatewayView(gateway.name, GatewayClient(session).servers())
    except Day2Error as exc:
        return GatewayView(gateway.name, error=str(exc).removeprefix(f"{gateway.name}: "))


def node_servers(views: Sequence[ServerView], node: str) -> list[ServerView]:
    """`node`'s servers, by instance index."""
    return sorted((v for v in views if v.node == node), key=lambda v: (v.instance is None, v.instance or 0))


def wait_idle(client: GatewayClient, node: str, timeout: float) -> tuple[list[ServerView], float, bool]:
    """Poll `show stat` until `node`'s servers hold no session and no queue, or `timeout` passes:
    (their last view, seconds waited, idle)."""
    started = time.monotonic()
    while True:
        servers = node_servers(client.servers(), node)
        waited = time.monotonic() - started
        if all(s.idle for s in servers):
            return servers, waited, True
        if waited >= timeout:
            return servers, waited, False
        time.sleep(min(POLL_S, max(0.0, timeout - waited)))
