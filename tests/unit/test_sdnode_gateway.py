"""`sdnode status`, `drain` and `undrain` against gateways: the real command line, ansible-inventory and
SSH (the fake sshd of test_sdnode_cli_ssh), and on each "gateway" a unix socket server that speaks
HAProxy 2.6's runtime API: `show stat` CSV with 2.6's header, and `set server ... state ...`. The
gateway's python3 (here: this machine's) talks to that socket, as it talks to /run/haproxy/admin.sock
on a real gateway."""

from __future__ import annotations

import json
import re
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from sdnode.cli import main
from sdnode.day2 import gateway
from sdnode.day2.gateway import ADMIN_SOCKET, classify, parse_show_stat, server_views
from sdnode.day2.keys import generate_key_pair
from test_sdnode_cli_ssh import FakeSSHD, Server, load

# `show stat` header as HAProxy 2.6 writes it, recorded from Debian 12's haproxy 2.6.12-1+deb12u4:
# the static fields (2.6.0's, with agg_server_status and agg_check_status backported), the "-" that
# ends them, then the ssl, h2 and h1 modules' fields. Every line ends with a comma, as HAProxy's do.
HEADER_2_6 = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,"
    "status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,"
    "tracked,type,rate,rate_lim,rate_max,check_status,check_code,check_duration,hrsp_1xx,hrsp_2xx,"
    "hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,hanafail,req_rate,req_rate_max,req_tot,cli_abrt,srv_abrt,"
    "comp_in,comp_out,comp_byp,comp_rsp,lastsess,last_chk,last_agt,qtime,ctime,rtime,ttime,"
    "agent_status,agent_code,agent_duration,check_desc,agent_desc,check_rise,check_fall,check_health,"
    "agent_rise,agent_fall,agent_health,addr,cookie,mode,algo,conn_rate,conn_rate_max,conn_tot,"
    "intercepted,dcon,dses,wrew,connect,reuse,cache_lookups,cache_hits,srv_icur,src_ilim,qtime_max,"
    "ctime_max,rtime_max,ttime_max,eint,idle_conn_cur,safe_conn_cur,used_conn_cur,need_conn_est,"
    "uweight,agg_server_status,agg_server_check_status,agg_check_status,-,ssl_sess,ssl_reused_sess,"
    "ssl_failed_handshake,h2_headers_rcvd,h2_data_rcvd,h2_settings_rcvd,h2_rst_stream_rcvd,"
    "h2_goaway_rcvd,h2_detected_conn_protocol_errors,h2_detected_strm_protocol_errors,"
    "h2_rst_stream_resp,h2_goaway_resp,h2_open_connections,h2_backend_open_streams,"
    "h2_total_connections,h2_backend_total_streams,h1_open_connections,h1_open_streams,"
    "h1_total_connections,h1_total_streams,h1_bytes_in,h1_bytes_out,h1_spliced_bytes_in,"
    "h1_spliced_bytes_out,"
)
COLUMNS = HEADER_2_6[2:].split(",")


def test_the_recorded_header_is_haproxy_2_6s() -> None:
    assert len(COLUMNS) == 103 + 1 + 3 + 13 + 8 + 1  # static fields, "-", ssl, h2, h1, the final comma's ""
    assert COLUMNS[:8] == ["pxname", "svname", "qcur", "qmax", "scur", "smax", "slim", "stot"]
    assert COLUMNS.index("uweight") == 99  # as numbered in 2.6's management guide, section 9.1
    assert (COLUMNS.index("status"), COLUMNS.index("weight"), COLUMNS.index("check_status")) == (17, 18, 36)


def csv_row(**values: object) -> str:
    unknown = set(values) - set(COLUMNS)
    assert not unknown, unknown
    return ",".join(str(values.get(name, "")) for name in COLUMNS)


@dataclass
class Backend:
    """One sdserve server as HAProxy holds it: health from checks, admin state from the runtime API."""

    healthy: bool = True  # the health check's verdict
    admin: str = "ready"  # ready, drain or maint
    weight: int = 1  # 0: the agent answered `up 0%`
    sessions: int = 0
    queue: int = 0
    finishing: int = 0  # sessions and queued requests that end per `show stat` while not in rotation

    def status(self) -> str:
        if self.admin == "maint":
            return "MAINT"
        if not self.healthy:
            return "DOWN"
        # HAProxy 2.6 says "(agent)" for any drained server with an agent check, as ours have.
        return "DRAIN (agent)" if self.admin == "drain" else "UP"


class FakeHAProxy:
    """A unix socket speaking HAProxy's runtime API in non-interactive mode: one command a connection."""

    def __init__(self, path: Path, servers: dict[str, Backend], level: str = "admin") -> None:
        self.path, self.servers, self.level = path, servers, level
        self.commands: list[str] = []
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode().strip()
                fake.commands.append(line)
                self.wfile.write(fake.answer(line).encode())

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, line: str) -> str:
        words = line.split()
        if line == "show stat":
            return self.show_stat()
        if words[:2] == ["set", "server"] and len(words) == 5 and words[3] == "state":
            if self.level != "admin":
                return "Permission denied\n\n"
            backend, _, name = words[2].partition("/")
            if backend != "sdserve":
                return "No such backend.\n\n"
            if name not in self.servers:
                return "No such server.\n\n"
            self.servers[name].admin = words[4]
            return "\n"
        return "Unknown command.\n\n"

    def show_stat(self) -> str:
        rows = [
            csv_row(pxname="https", svname="FRONTEND", scur=3, status="OPEN", type=0),
            # Another proxy whose server names look like ours: only backend sdserve counts.
            csv_row(pxname="other", svname="fleet1_0", scur=9, status="DOWN", type=2, weight=1),
        ]
        for name, b in self.servers.items():
            if b.admin != "ready":  # drained: its work ends, nothing new comes
                b.sessions, b.queue = max(0, b.sessions - b.finishing), max(0, b.queue - b.finishing)
            rows.append(
                csv_row(
                    pxname="sdserve",
                    svname=name,
                    qcur=b.queue,
                    scur=b.sessions,
                    status=b.status(),
                    weight=b.weight,
                    type=2,
                    check_status="L7OK" if b.healthy else "L7STS",
                    check_code=200 if b.healthy else 503,
                    last_chk="" if b.healthy else "Service Unavailable",
                    last_agt="via agent : up",  # what 2.6.12 records for `up 0%` and `up 100%` alike
                    agent_status="L7OK",
                )
            )
        rows.append(csv_row(pxname="sdserve", svname="BACKEND", status="UP", type=1, weight=2))
        return "\n".join([HEADER_2_6, *(row + "," for row in rows)]) + "\n\n"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class GatewaySSHD(FakeSSHD):
    """The fake sshd, with this gateway's own socket standing in for /run/haproxy/admin.sock."""

    admin_socket: str = ""

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        command = command.replace(b"/run/haproxy/admin.sock", self.admin_socket.encode())  # the contract's
        return super().check_channel_exec_request(channel, command)


@dataclass
class Fleet:
    inventory: Path
    haproxy: dict[str, FakeHAProxy] = field(default_factory=dict)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    for name in ("host", "client"):
        generate_key_pair(base / name)
    return {"host": base / "host", "client": base / "client"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="sdgw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_fleet(
    keys: dict[str, Path], tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator:
    """An inventory of two serving nodes (out of reach: the gateways' view is the subject) and gateways,
    each an SSH server with a fake HAProxy of the given servers; None: a gateway out of reach."""
    monkeypatch.setenv("SDNODE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SDNODE_INVENTORY", raising=False)
    monkeypatch.setattr(gateway, "POLL_S", 0.01)
    started: list[Server | FakeHAProxy] = []

    def make(gateways: dict[str, dict[str, Backend] | None], level: str = "admin") -> Fleet:
        known = tmp_path / "known_hosts"
        known.touch()
        host_key = load(keys["host"])
        fleet = Fleet(tmp_path / "inv")
        hosts: dict[str, dict] = {}
        for name, servers in gateways.items():
            port = closed_port()
            if servers is not None:
                fake = FakeHAProxy(short_dir / f"{name}.sock", servers, level)
                sshd = GatewaySSHD(load(keys["client"]), admin_socket=str(fake.path))
                server = Server(host_key, sshd)
                started.extend([fake, server])
                fleet.haproxy[name], port = fake, server.port
            with known.open("a") as f:
                f.write(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
            hosts[name] = {"ansible_port": port}
        common = {
            "ansible_host": "127.0.0.1",
            "ansible_user": "ops",
            "ansible_ssh_private_key_file": str(keys["client"]),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known}",
        }
        nodes = {n: {**common, "ansible_port": closed_port(), "sdnode_accelerator": "cpu"} for n in NODES}
        fleet.inventory.mkdir()
        (fleet.inventory / "hosts.yml").write_text(
            json.dumps(
                {
                    "all": {
                        "children": {
                            "sdnodes": {"hosts": nodes},
                            "sdgateways": {"hosts": {n: {**common, **v} for n, v in hosts.items()}},
                        }
                    }
                }
            )
        )
        return fleet

    yield make
    for thing in started:
        thing.close()


NODES = ("fleet1", "fleet2")


def sets(fake: FakeHAProxy) -> list[str]:
    return [c for c in fake.commands if c.startswith("set ")]


# --------------------------------------------------------------------------------------------------
# reading show stat


@pytest.mark.parametrize(
    "status, weight, check, state, why",
    [
        ("UP", 1, "L7OK 200", "UP", ""),
        ("DRAIN (agent)", 1, "L7OK 200", "DRAIN", "drained by the operator"),  # agent check configured
        ("DRAIN", 1, "L7OK 200", "DRAIN", "drained by the operator"),
        ("UP", 0, "L7OK 200", "UP", "weight 0 from the service's agent"),
        ("DOWN", 1, "L7STS 503", "DOWN", "down by health check (L7STS 503)"),
        ("DOWN (agent)", 1, "L7OK 200", "DOWN", "down by the service's agent"),
        ("DOWN 1/2", 1, "L7OK 200", "DOWN", "coming up: 1 of 2 health checks passed"),
        ("UP 2/3", 1, "L4CON", "UP", "failing health checks (L4CON)"),
        ("MAINT", 1, "", "MAINT", "maintenance, set by the operator"),
        ("MAINT (via sdserve/x_0)", 1, "", "MAINT", "inherited (via sdserve/x_0)"),
        ("NOLB", 1, "L7OK 200", "NOLB", "stopping"),
    ],
)
def test_state_and_who_put_it_there(status: str, weight: int, check: str, state: str, why: str) -> None:
    got_state, got_why = classify(status, weight, check)
    assert got_state == state and why in got_why
    assert bool(got_why) == bool(why)


def test_show_stat_is_read_by_column_name() -> None:
    fake = FakeHAProxy.__new__(FakeHAProxy)  # its CSV only, no socket
    fake.servers = {"fleet1_0": Backend(sessions=2, queue=1), "my_host_1": Backend(admin="drain")}
    views = server_views("gw1", parse_show_stat(fake.show_stat()))
    assert [
        (v.server, v.node, v.instance, v.state, v.sessions, v.queue, v.weight, v.check) for v in views
    ] == [
        ("fleet1_0", "fleet1", 0, "UP", 2, 1, 1, "L7OK 200"),
        ("my_host_1", "my_host", 1, "DRAIN", 0, 0, 1, "L7OK 200"),  # a host name with `_` in it
    ]
    # A column added in front (as a later HAProxy might) changes nothing: names, not positions.
    shifted = fake.show_stat().replace("# pxname,", "# newfield,pxname,").replace("\nhttps,", "\nx,https,")
    shifted = "\n".join(
        line if line.startswith(("#", "x,")) or not line else "x," + line for line in shifted.split("\n")
    )
    assert [v.as_dict() for v in server_views("gw1", parse_show_stat(shifted))] == [
        v.as_dict() for v in views
    ]
    with pytest.raises(ValueError, match="not `show stat` CSV"):
        parse_show_stat("Unknown command.\n")


# --------------------------------------------------------------------------------------------------
# status


def test_status_shows_each_gateways_view(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet(
        {
            "gw1": {
                "fleet1_0": Backend(sessions=2, queue=1),
                "fleet1_1": Backend(admin="drain"),
                "fleet2_0": Backend(healthy=False),
                "fleet2_1": Backend(weight=0),
            },
            "gw2": {"fleet1_0": Backend(), "fleet1_1": Backend(), "fleet2_0": Backend(admin="maint")},
        }
    )
    assert main(["status", "-i", str(fleet.inventory)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("gw1 ", "gw2 "))]
    rows = {tuple(line.split()[:2]): line for line in lines}
    assert len(rows) == len(lines) == 7  # one row per server of backend sdserve, nothing else
    assert rows[("gw1", "fleet1_0")].split()[2:7] == ["UP", "1", "2", "1", "L7OK"]
    assert "DRAIN" in rows[("gw1", "fleet1_1")] and "drained by the operator" in rows[("gw1", "fleet1_1")]
    assert (
        "DOWN" in rows[("gw1", "fleet2_0")]
        and "down by health check (L7STS 503)" in rows[("gw1", "fleet2_0")]
    )
    assert "weight 0 from the service's agent" in rows[("gw1", "fleet2_1")]
    assert "MAINT" in rows[("gw2", "fleet2_0")]
    assert "gw2: no server of fleet2" not in out  # it has fleet2_0
    assert "0/2 nodes in rotation at 2 gateways: fleet1, fleet2" in out
    # Only backend sdserve: the other proxy's fleet1_0 (9 sessions) is not shown.
    assert all(" 9 " not in line for line in rows.values())
    assert [c for c in fleet.haproxy["gw1"].commands] == ["show stat"]  # status changes nothing


def test_status_json_per_node_and_a_gateway_out_of_reach(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet(
        {"gw1": {"fleet1_0": Backend(sessions=1), "fleet2_0": Backend(admin="drain")}, "gw2": None}
    )
    assert main(["status", "-i", str(fleet.inventory), "--json", "--limit", "fleet1"]) == 1
    [node] = json.loads(capsys.readouterr().out)  # --limit picks nodes; every gateway still answers
    assert node["node"] == "fleet1" and node["in_rotation"] is False
    by_gateway = {g["gateway"]: g for g in node["gateways"]}
    assert (by_gateway["gw1"]["server"], by_gateway["gw1"]["state"], by_gateway["gw1"]["sessions"]) == (
        "fleet1_0",
        "UP",
        1,
    )
    assert by_gateway["gw1"]["in_rotation"] is True
    assert "gw2" in by_gateway and "connection refused" in by_gateway["gw2"]["error"]


def test_status_without_gateways_is_as_before(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet({})
    assert main(["status", "-i", str(fleet.inventory), "--json"]) == 1  # the nodes are out of reach
    report = json.loads(capsys.readouterr().out)
    assert [(n["node"], n["in_rotation"], n["gateways"]) for n in report] == [
        ("fleet1", None, []),
        ("fleet2", None, []),
    ]
    assert main(["status", "-i", str(fleet.inventory)]) == 1
    out = capsys.readouterr().out
    assert "0/2 nodes healthy" in out and "backend sdserve" not in out and "in rotation" not in out


# --------------------------------------------------------------------------------------------------
# drain / undrain


def test_drain_at_every_gateway_then_wait_until_idle(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet(
        {
            "gw1": {
                "fleet1_0": Backend(sessions=3, queue=2, finishing=1),
                "fleet1_1": Backend(sessions=1, finishing=1),
                "fleet2_0": Backend(sessions=5),
            },
            "gw2": {"fleet1_0": Backend(), "fleet1_1": Backend(), "fleet2_0": Backend()},
        }
    )
    assert main(["drain", "-i", str(fleet.inventory), "fleet1"]) == 0
    out = capsys.readouterr().out
    for name in ("gw1", "gw2"):
        assert sets(fleet.haproxy[name]) == [
            "set server sdserve/fleet1_0 state drain",
            "set server sdserve/fleet1_1 state drain",
        ]
        servers = fleet.haproxy[name].servers
        assert (servers["fleet1_0"].sessions, servers["fleet1_0"].queue, servers["fleet1_1"].sessions) == (
            0,
            0,
            0,
        )
        assert servers["fleet2_0"].admin == "ready"
    # gw1 was polled until the last queued request ended (3 polls after the one before the change).
    assert fleet.haproxy["gw1"].commands.count("show stat") == 1 + 3
    assert "gw1: fleet1_0 UP -> DRAIN, fleet1_1 UP -> DRAIN; no sessions and nothing queued after" in out
    assert "gw2: fleet1_0 UP -> DRAIN, fleet1_1 UP -> DRAIN;" in out
    assert "fleet1: drained at 2/2 gateways" in out

    assert main(["undrain", "-i", str(fleet.inventory), "fleet1"]) == 0
    out = capsys.readouterr().out
    assert sets(fleet.haproxy["gw2"])[-2:] == [
        "set server sdserve/fleet1_0 state ready",
        "set server sdserve/fleet1_1 state ready",
    ]
    assert "gw1: fleet1_0 DRAIN -> UP, fleet1_1 DRAIN -> UP; in rotation" in out
    assert all(b.admin == "ready" for fake in fleet.haproxy.values() for b in fake.servers.values())


def test_drain_no_wait_and_timeout(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet({"gw1": {"fleet1_0": Backend(sessions=2, queue=1), "fleet2_0": Backend()}})
    assert main(["drain", "-i", str(fleet.inventory), "fleet1", "--no-wait"]) == 0
    assert "gw1: fleet1_0 UP -> DRAIN; 2 sessions, 1 queued now (not waiting)" in capsys.readouterr().out
    assert fleet.haproxy["gw1"].commands.count("show stat") == 2  # before and once after: no waiting

    # The requests never end: past --timeout it says what is left and exits 1; the drain stays.
    assert main(["drain", "-i", str(fleet.inventory), "fleet1", "--timeout", "0.3"]) == 1
    out = capsys.readouterr().out
    assert re.search(
        r"gw1: fleet1_0 DRAIN -> DRAIN; still 2 sessions, 1 queued after 0\.\d s \(--timeout\)", out
    )
    assert fleet.haproxy["gw1"].servers["fleet1_0"].admin == "drain"


def test_undrain_of_a_server_whose_health_check_fails_exits_1(
    make_fleet, capsys: pytest.CaptureFixture
) -> None:
    fleet = make_fleet({"gw1": {"fleet1_0": Backend(admin="drain", healthy=False), "fleet2_0": Backend()}})
    assert main(["undrain", "-i", str(fleet.inventory), "fleet1"]) == 1
    out = capsys.readouterr().out
    # HAProxy shows a server that fails its checks as DOWN, drained or not.
    assert "gw1: fleet1_0 DOWN -> DOWN; not in rotation: fleet1_0: down by health check (L7STS 503)" in out
    assert fleet.haproxy["gw1"].servers["fleet1_0"].admin == "ready"


@pytest.mark.parametrize(
    "gateways, node, message",
    [
        ({"gw1": {"fleet1_0": Backend()}}, "fleet9", "fleet9 is not a host of group sdnodes in inventory"),
        (
            {"gw1": {"fleet1_0": Backend()}, "gw2": {"fleet2_0": Backend()}},
            "fleet1",
            "gw2: no server of fleet1 in backend sdserve (its servers: fleet2_0)",
        ),
        ({"gw1": {"fleet1_0": Backend()}, "gw2": None}, "fleet1", "gw2: cannot reach ops@127.0.0.1:"),
        ({}, "fleet1", "no host in group sdgateways in inventory"),
    ],
    ids=["unknown-node", "no-server-at-a-gateway", "gateway-out-of-reach", "no-gateways"],
)
def test_drain_refusals_change_nothing(
    make_fleet, capsys: pytest.CaptureFixture, gateways: dict, node: str, message: str
) -> None:
    fleet = make_fleet(gateways)
    for command in ("drain", "undrain"):
        assert main([command, "-i", str(fleet.inventory), node]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert all(sets(fake) == [] for fake in fleet.haproxy.values())


def test_a_socket_that_refuses_set_server_is_an_error_naming_the_gateway(
    make_fleet, capsys: pytest.CaptureFixture
) -> None:
    """A stats socket below level admin answers `Permission denied` to `set server`."""
    fleet = make_fleet({"gw1": {"fleet1_0": Backend()}}, level="operator")
    assert main(["drain", "-i", str(fleet.inventory), "fleet1"]) == 2
    captured = capsys.readouterr()
    assert "error: gw1: HAProxy refused `set server sdserve/fleet1_0 state drain`: Permission denied" in (
        captured.err
    )
    assert "fleet1: drained at 0/1 gateway" in captured.out


def test_no_admin_socket_on_the_gateway(make_fleet, capsys: pytest.CaptureFixture) -> None:
    fleet = make_fleet({"gw1": {"fleet1_0": Backend()}})
    fleet.haproxy["gw1"].close()
    fleet.haproxy["gw1"].path.unlink()
    assert main(["drain", "-i", str(fleet.inventory), "fleet1"]) == 2
    err = capsys.readouterr().err
    assert f"gw1: HAProxy's admin socket {ADMIN_SOCKET} does not exist" in err
