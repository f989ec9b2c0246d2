"""sdnode's SSH layer against an in-process Paramiko SSH server on loopback: host key checks, key auth,
commands, HTTP through direct-tcpip channels to a real HTTP server (IPv4 and IPv6), including sshd's
refusals, and `status` taking each instance's endpoint from the node's manifest."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import paramiko
import pytest
from sdnode.day2 import Day2Error, service
from sdnode.day2.inventory import Node
from sdnode.day2.keys import generate_key_pair
from sdnode.day2.remote import NodeSession
from sdnode.day2.service import node_status


def _pipe(a: paramiko.Channel, b: socket.socket) -> None:
    """Copy both ways between a channel and a socket until either side closes."""

    def one_way(read, write, done) -> None:
        try:
            while data := read(65536):
                write(data)
        except OSError:
            pass
        finally:
            done()

    threading.Thread(
        target=one_way, args=(a.recv, b.sendall, lambda: b.shutdown(socket.SHUT_WR)), daemon=True
    ).start()
    threading.Thread(target=one_way, args=(b.recv, a.sendall, a.shutdown_write), daemon=True).start()


@dataclass
class FakeSSHD(paramiko.ServerInterface):
    """Just enough of sshd: publickey auth for one key, exec via sh, direct-tcpip when allowed."""

    client_key: paramiko.PKey
    allow_forwarding: bool = True
    targets: dict[int, socket.socket] = field(default_factory=dict)

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_base64() == self.client_key.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return (
            paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        )

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        if not self.allow_forwarding:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        try:
            self.targets[chanid] = socket.create_connection(destination, timeout=5)
        except OSError:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        def run() -> None:
            pipe = subprocess.PIPE
            proc = subprocess.Popen(["sh", "-c", command.decode()], stdin=pipe, stdout=pipe, stderr=pipe)

            def feed() -> None:  # the channel's stdin, until the client's EOF
                try:
                    while data := channel.recv(65536):
                        proc.stdin.write(data)
                    proc.stdin.close()
                except (OSError, ValueError):
                    pass

            threading.Thread(target=feed, daemon=True).start()
            out, err = proc.stdout.read(), proc.stderr.read()
            channel.sendall(out)
            channel.sendall_stderr(err)
            channel.send_exit_status(proc.wait(timeout=30))
            channel.close()

        threading.Thread(target=run, daemon=True).start()
        return True


class Server:
    def __init__(self, host_key: paramiko.PKey, sshd: FakeSSHD) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.host_key, self.sshd = host_key, sshd
        self.transports: list[paramiko.Transport] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(conn)
            transport.add_server_key(self.host_key)
            self.transports.append(transport)
            threading.Thread(target=self._session, args=(transport,), daemon=True).start()

    def _session(self, transport: paramiko.Transport) -> None:
        try:
            transport.start_server(server=self.sshd)
        except (paramiko.SSHException, EOFError):
            return
        while transport.is_active():
            channel = transport.accept(1)
            if channel is not None and channel.get_id() in self.sshd.targets:
                _pipe(channel, self.sshd.targets.pop(channel.get_id()))

    def close(self) -> None:
        self.listener.close()
        for transport in self.transports:
            transport.close()


class Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def do_GET(self) -> None:
        Handler.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        body = json.dumps({"status": "ready", "path": self.path}).encode()
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        received = self.rfile.read(int(self.headers["Content-Length"]))
        Handler.seen.append({"path": self.path, "bytes": len(received)})
        body = json.dumps({"received": len(received), "type": self.headers.get("Content-Type")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("host", "other_host", "client", "stranger"):
        generate_key_pair(base / name)
        out[name] = base / name
    return out


def load(path: Path) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key_file(str(path))


class HTTP6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(server: ThreadingHTTPServer, url: str) -> Iterator[str]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield url.format(port=server.server_address[1])
    server.shutdown()


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    """The HTTP server on the "node", as a manifest's instance url names it (no trailing slash)."""
    yield from serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler), "http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def http6_url() -> Iterator[str]:
    """The same on IPv6 loopback, as the node records an instance listening on `::`."""
    yield from serve(HTTP6Server(("::1", 0), Handler), "http://[::1]:{port}")


def make_server(keys: dict[str, Path], allow_forwarding: bool = True) -> Server:
    return Server(load(keys["host"]), FakeSSHD(load(keys["client"]), allow_forwarding))


def known_hosts(tmp_path: Path, port: int, key: paramiko.PKey) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(f"[127.0.0.1]:{port} {key.get_name()} {key.get_base64()}\n")
    return path


def node(port: int, key: Path, known: Path) -> Node:
    return Node(name="n1", address="127.0.0.1", port=port, user="ops", key_file=key, known_hosts=(known,))


@pytest.fixture
def server(keys: dict[str, Path]) -> Iterator[Server]:
    s = make_server(keys)
    yield s
    s.close()


def test_commands_and_http_over_the_connection(
    server: Server, keys: dict, tmp_path: Path, http_url: str
) -> None:
    target = node(server.port, keys["client"], known_hosts(tmp_path, server.port, load(keys["host"])))
    with NodeSession(target) as session:
        assert session.run("echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")
        Handler.seen.clear()
        answer = session.http("GET", f"{http_url}/readyz", token="s3cret-token")
        assert (answer.status, answer.json()["status"]) == (200, "ready")
        assert answer.headers["content-type"] == "application/json"
        assert Handler.seen == [{"path": "/readyz", "authorization": "Bearer s3cret-token"}]
        # Several requests over the same SSH connection, each on its own channel.
        assert [session.http("GET", f"{http_url}/nope").status for _ in range(3)] == [404, 404, 404]


def test_unknown_host_key_is_refused(server: Server, keys: dict, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(Day2Error, match=r"n1: host key of 127\.0\.0\.1 is not in .*known_hosts"):
        NodeSession(node(server.port, keys["client"], empty)).open()


def test_changed_host_key_is_refused(server: Server, keys: dict, tmp_path: Path) -> None:
    wrong = known_hosts(tmp_path, server.port, load(keys["other_host"]))
    with pytest.raises(Day2Error, match="does not match"):
        NodeSession(node(server.port, keys["client"], wrong)).open()


def test_a_key_the_node_does_not_trust(server: Server, keys: dict, tmp_path: Path) -> None:
    known = known_hosts(tmp_path, server.port, load(keys["host"]))
    with pytest.raises(Day2Error, match="refused the key"):
        NodeSession(node(server.port, keys["stranger"], known)).open()


def test_missing_known_hosts_file_is_named(keys: dict, tmp_path: Path) -> None:
    with pytest.raises(Day2Error, match=r"known_hosts file .* does not exist"):
        NodeSession(node(22, keys["client"], tmp_path / "absent"))


def test_nothing_listening_on_the_node(server: Server, keys: dict, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with (
        NodeSession(
            node(server.port, keys["client"], known_hosts(tmp_path, server.port, load(keys["host"])))
        ) as session,
        pytest.raises(Day2Error, match="connection refused"),
    ):
        session.http("GET", f"http://127.0.0.1:{closed}/readyz")


def test_forwarding_forbidden_by_sshd_falls_back_to_the_nodes_python(
    keys: dict, tmp_path: Path, http_url: str
) -> None:
    """AllowTcpForwarding no: the same request, made on the node by its python3, same answer."""
    strict = make_server(keys, allow_forwarding=False)
    try:
        target = node(strict.port, keys["client"], known_hosts(tmp_path, strict.port, load(keys["host"])))
        with NodeSession(target) as session:
            Handler.seen.clear()
            answer = session.http("GET", f"{http_url}/readyz", token="s3cret-token")
            assert (answer.status, answer.json()["status"]) == (200, "ready")
            assert answer.headers["content-type"] == "application/json"
            assert session.http("GET", f"{http_url}/nope").status == 404  # an error status is an answer
            assert Handler.seen == [
                {"path": "/readyz", "authorization": "Bearer s3cret-token"},
                {"path": "/nope", "authorization": None},
            ]
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                closed = s.getsockname()[1]
            with pytest.raises(Day2Error, match=r"cannot connect on the node: .*Connection refused"):
                session.http("GET", f"http://127.0.0.1:{closed}/readyz")
            # An image to edit: a body past the 128 KiB one command-line argument may hold.
            big = {"init_images": ["A" * 600_000]}
            answer = session.http("POST", f"{http_url}/sdapi/v1/img2img", body=big)
            assert answer.json() == {"received": len(json.dumps(big)), "type": "application/json"}
    finally:
        strict.close()


def test_http_to_an_ipv6_url_both_ways(keys: dict, tmp_path: Path, http6_url: str) -> None:
    """An instance listening on `::` is recorded as http://[::1]:PORT; both transports reach it."""
    for forwarding in (True, False):
        ssh = make_server(keys, allow_forwarding=forwarding)
        try:
            target = node(ssh.port, keys["client"], known_hosts(tmp_path, ssh.port, load(keys["host"])))
            with NodeSession(target) as session:
                answer = session.http("GET", f"{http6_url}/readyz")
                assert (answer.status, answer.json()["path"]) == (200, "/readyz"), forwarding
        finally:
            ssh.close()


def write_manifest(path: Path, instances: object) -> None:
    path.write_text(json.dumps({"model": {"id": "tiny", "revision": "r1"}, "instances": instances}))


@pytest.fixture
def manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The node's manifest: the fake sshd runs commands on this machine, so a file of the test's own."""
    path = tmp_path / "manifest.json"
    monkeypatch.setattr(service, "MANIFEST", str(path))
    return path


def test_status_takes_instances_and_endpoints_from_the_manifest(
    server: Server, keys: dict, tmp_path: Path, manifest: Path, http6_url: str
) -> None:
    """Instance 3 on IPv6 at a port no inventory names: status asks exactly there, with the key."""
    port = int(http6_url.rsplit(":", 1)[1])
    write_manifest(manifest, [{"name": "sdserve@3", "index": 3, "port": port, "url": http6_url}])
    state = tmp_path / "state"
    (state / "api-keys").mkdir(parents=True)
    (state / "api-keys" / "n1.default.key").write_text("generated-key-000000\n")
    known = known_hosts(tmp_path, server.port, load(keys["host"]))
    target = replace(node(server.port, keys["client"], known), accelerator="cpu")
    Handler.seen.clear()
    result = node_status(target, state)
    assert result.error == ""
    [instance] = result.instances
    assert (instance.instance, instance.port, instance.url, instance.ready) == (3, port, http6_url, "yes")
    assert instance.model == "tiny@r1"
    assert Handler.seen == [
        {"path": "/readyz", "authorization": None},
        {"path": "/metrics", "authorization": "Bearer generated-key-000000"},
    ]


@pytest.mark.parametrize(
    "instances, message",
    [
        (
            ["sdserve@0"],
            "{path} is in the old format (instances without endpoints); deploy it again (make deploy)",
        ),
        ([], "{path} records no instances; deploy it again (make deploy)"),
        (None, "no {path}; deploy it again (make deploy) so that it records its instances"),  # no manifest
    ],
)
def test_status_of_a_node_without_endpoints_says_to_deploy(
    server: Server, keys: dict, tmp_path: Path, manifest: Path, instances: object, message: str
) -> None:
    if instances is not None:
        write_manifest(manifest, instances)
    known = known_hosts(tmp_path, server.port, load(keys["host"]))
    result = node_status(replace(node(server.port, keys["client"], known), accelerator="cpu"), tmp_path)
    assert (result.reachable, result.instances, result.healthy) == (True, [], False)
    assert message.format(path=manifest) in result.error and "\n" not in result.error
