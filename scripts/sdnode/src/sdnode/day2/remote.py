"""SSH to a node (Fabric over Paramiko, host keys checked against the inventory's known_hosts) and HTTP to
the node's service over that SSH connection: a direct-tcpip channel per request to a URL as the node itself
sees it (the manifest's instance url), so the service needs no open port and the node needs no curl."""

from __future__ import annotations

import base64
import json
import shlex
import socket
from pathlib import Path
from typing import Any

import httpcore
import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from sdnode.day2 import Day2Error
from sdnode.day2.inventory import Node

SYSTEM_KNOWN_HOSTS = (Path("~/.ssh/known_hosts").expanduser(), Path("/etc/ssh/ssh_known_hosts"))
CONNECT_TIMEOUT_S = 15.0


def host_key_client(known_hosts: tuple[Path, ...] | list[Path]) -> paramiko.SSHClient:
    """An SSHClient that knows only the host keys in `known_hosts` (OpenSSH's default files when empty)
    and refuses any host it does not know: no trust on first use."""
    client = paramiko.SSHClient()
    files = list(known_hosts) or [p for p in SYSTEM_KNOWN_HOSTS if p.exists()]
    for path in files:
        if path.exists():
            try:
                client.get_host_keys().load(str(path))
            except (OSError, paramiko.SSHException) as exc:
                raise Day2Error(f"cannot read known_hosts file {path}: {exc}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def describe_connect_error(node: Node, exc: BaseException) -> str:
    """One line saying why the SSH connection to `node` failed and what to look at."""
    where = f"{node.user}@{node.address}:{node.port}"
    known = ", ".join(map(str, node.known_hosts)) or "~/.ssh/known_hosts"
    if isinstance(exc, paramiko.BadHostKeyException):
        return (
            f"{node.name}: host key of {node.address} does not match {known} "
            "(node rebuilt, or someone in the middle)"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        key = node.key_file or "the default keys/agent"
        return f"{node.name}: {where} refused the key {key} ({exc})"
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        return (
            f"{node.name}: host key of {node.address} is not in {known}; check its fingerprint on the "
            f"console, then add it (ssh-keyscan -p {node.port} {node.address})"
        )
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"{node.name}: cannot reach {where}: timed out"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"{node.name}: cannot reach {where}: connection refused"
    if isinstance(exc, OSError):
        return f"{node.name}: cannot reach {where}: {exc.strerror or exc}"
    return f"{node.name}: SSH to {where} failed: {exc}"


OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED = paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
# RFC 4254 channel-open failures, as an operator would want them explained.
FORWARD_FAILURES = {
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED: "sshd forbids it (AllowTcpForwarding)",
    paramiko.common.OPEN_FAILED_CONNECT_FAILED: "connection refused (nothing listens there)",
}

# The same request made by the node's own Python (stdlib only) when sshd forbids TCP forwarding
# (AllowTcpForwarding no): the request goes in as base64 JSON in argv, the answer comes back on stdout.
_NODE_HTTP = """
import base64, json, sys, urllib.error, urllib.request
r = json.loads(sys.stdin.buffer.read())
req = urllib.request.Request(r["url"], data=base64.b64decode(r["body"]) or None, method=r["method"],
                             headers=r["headers"])
try:
    resp = urllib.request.urlopen(req, timeout=r["timeout"])
except urllib.error.HTTPError as e:
    resp = e
except OSError as e:
    json.dump({"error": str(getattr(e, "reason", e))}, sys.stdout)
    sys.exit(0)
json.dump({"status": resp.status, "headers": dict(resp.headers.items()),
           "body": base64.b64encode(resp.read()).decode()}, sys.stdout)
"""


class _ForwardingForbidden(httpcore.ConnectError):
    """sshd refused the direct-tcpip channel by policy (not because nothing listens)."""


class _ChannelStream(httpcore.NetworkStream):
    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._channel.settimeout(timeout)
        try:
            return self._channel.recv(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("no answer from the service in time") from None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._channel.settimeout(timeout)
        try:
            self._channel.sendall(buffer)
        except TimeoutError:
            raise httpcore.WriteTimeout("the service did not take the request in time") from None

    def close(self) -> None:
        self._channel.close()


class _SSHBackend(httpcore.NetworkBackend):
    """httpcore's network layer with TCP connections made by the node's sshd (direct-tcpip)."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self._transport = transport

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        try:
            channel = self._transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout
            )
        except paramiko.ChannelException as exc:
            reason = FORWARD_FAILURES.get(exc.code, exc.text)
            error = (
                _ForwardingForbidden
                if exc.code == OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
                else httpcore.ConnectError
            )
            raise error(f"{host}:{port} on the node: {reason}") from None
        except (paramiko.SSHException, OSError) as exc:
            raise httpcore.ConnectError(f"{host}:{port} on the node: {exc}") from None
        return _ChannelStream(channel)


class HTTPResult:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def node_python(node: Node) -> str:
    """The node's python3 for the small stdlib-only scripts sdnode runs there: the inventory's
    ansible_python_interpreter when it names a path, else python3 (Ansible's auto-detection modes and
    templates mean nothing outside a play)."""
    python = str(node.vars.get("ansible_python_interpreter") or "python3")
    if "{{" in python or python == "auto" or python.startswith("auto_"):
        return "python3"
    return python


class NodeSession:
    """An open SSH connection to one node: commands, files and the service's HTTP API."""

    def __init__(self, node: Node, connect_timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.node = node
        if node.key_file is not None and not node.key_file.exists():
            raise Day2Error(f"{node.name}: ansible_ssh_private_key_file {node.key_file} does not exist")
        for path in node.known_hosts:
            if not path.exists():
                raise Day2Error(
                    f"{node.name}: known_hosts file {path} (from ansible_ssh_common_args) does not exist"
                )
        connect_kwargs: dict[str, Any] = {"banner_timeout": connect_timeout, "auth_timeout": connect_timeout}
        if node.key_file is not None:
            # Only the inventory's key, as ansible does with IdentitiesOnly; no agent, no ~/.ssh keys.
            connect_kwargs.update(key_filename=str(node.key_file), look_for_keys=False, allow_agent=False)
        self.connection = Connection(
            host=node.address,
            user=node.user,
            port=node.port,
            # An explicit empty SSHConfig: the inventory decides, not ~/.ssh/config.
            config=Config(ssh_config=paramiko.SSHConfig()),
            connect_timeout=connect_timeout,
            connect_kwargs=connect_kwargs,
        )
        # Fabric's own client auto-adds unknown host keys; ours rejects them.
        self.connection.client = host_key_client(node.known_hosts)
        self._pool: httpcore.ConnectionPool | None = None
        self._forwarding = True  # False once sshd refused a direct-tcpip channel by policy

    def open(self) -> NodeSession:
        try:
            self.connection.open()
        except Exception as exc:
            self.close()
            raise Day2Error(describe_connect_error(self.node, exc)) from None
        return self

    def __enter__(self) -> NodeSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.connection.close()

    def run(self, command: str, *, sudo: bool = False, timeout: float | None = 120) -> tuple[int, str, str]:
        """Run `command` on the node (as root via sudo -n when `sudo` and the inventory says become)."""
        if sudo:
            command = self.node.sudo(command)
        try:
            result = self.connection.run(command, hide=True, warn=True, in_stream=False, timeout=timeout)
        except CommandTimedOut:
            raise Day2Error(f"{self.node.name}: `{command}` took over {timeout:.0f} s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Day2Error(f"{self.node.name}: lost the SSH connection running `{command}`: {exc}") from None
        return result.exited, result.stdout, result.stderr

    def run_with_input(self, command: str, data: bytes, *, timeout: float) -> tuple[int, str, str]:
        """Run `command` on the node with `data` on its stdin, then EOF. Straight on a Paramiko channel:
        Fabric's in_stream feeds 1000 bytes per 10 ms, seconds for an image."""
        try:
            self.connection.open()
            channel = self.connection.transport.open_session(timeout=CONNECT_TIMEOUT_S)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Day2Error(f"{self.node.name}: lost the SSH connection: {exc}") from None
        channel.settimeout(timeout)
        try:
            channel.exec_command(command)
            try:
                channel.sendall(data)
                channel.shutdown_write()
            except OSError:
                pass  # it stopped reading (it failed): its stderr and status below say why
            out = channel.makefile("rb").read()  # stderr is a line at most: its window never fills
            err = channel.makefile_stderr("rb").read()
            return channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        except TimeoutError:
            raise Day2Error(f"{self.node.name}: `{command}` took over {timeout:.0f} s") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise Day2Error(f"{self.node.name}: lost the SSH connection running `{command}`: {exc}") from None
        finally:
            channel.close()

    def http(
        self, method: str, url: str, *, token: str | None = None, body: Any = None, timeout: float = 30.0
    ) -> HTTPResult:
        """One HTTP request to `url` as the node itself reaches it; raises Day2Error when it cannot be
        made. An HTTP error status is a result, not an exception."""
        if not self._forwarding:
            return self._http_by_node(method, url, token, body, timeout)
        if self._pool is None:
            transport = self.connection.transport
            if transport is None or not transport.is_active():
                raise Day2Error(f"{self.node.name}: not connected")
            self._pool = httpcore.ConnectionPool(network_backend=_SSHBackend(transport), max_connections=32)
        headers = [("Accept", "*/*")]
        content = b""
        if token:
            headers.append(("Authorization", f"Bearer {token}"))
        if body is not None:
            content = json.dumps(body).encode()
            headers.append(("Content-Type", "application/json"))
        try:
            response = self._pool.request(
                method,
                url,
                headers=headers,
                content=content,
                extensions={"timeout": {"connect": 15.0, "read": timeout, "write": 30.0, "pool": timeout}},
            )
        except httpcore.TimeoutException:
            raise Day2Error(f"{self.node.name}: {method} {url}: no answer in {timeout:.0f} s") from None
        except _ForwardingForbidden:
            self._forwarding = False
            return self._http_by_node(method, url, token, body, timeout)
        except httpcore.ConnectError as exc:
            raise Day2Error(f"{self.node.name}: {method} {url}: cannot connect to {exc}") from None
        except httpcore.NetworkError as exc:
            raise Day2Error(f"{self.node.name}: {method} {url}: {exc}") from None
        except httpcore.ProtocolError as exc:
            raise Day2Error(f"{self.node.name}: {method} {url}: bad HTTP answer: {exc}") from None
        decoded = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        return HTTPResult(response.status, decoded, response.content)

    def _http_by_node(
        self, method: str, url: str, token: str | None, body: Any, timeout: float
    ) -> HTTPResult:
        """The request made on the node by its python3 (for sshd with AllowTcpForwarding no)."""
        headers = {"Accept": "*/*"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        content = b""
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = {
            "url": url,
            "method": method,
            "headers": headers,
            "timeout": timeout,
            "body": base64.b64encode(content).decode(),
        }
        python = node_python(self.node)
        # On stdin, not in argv: an image to edit can be larger than one argument may be (128 KiB).
        command = shlex.join([python, "-c", _NODE_HTTP])
        rc, out, err = self.run_with_input(command, json.dumps(request).encode(), timeout=timeout + 15)
        try:
            answer = json.loads(out)
        except json.JSONDecodeError:
            detail = (err.strip().splitlines() or [f"rc={rc}"])[-1]
            raise Day2Error(f"{self.node.name}: {method} {url} (via the node's {python}): {detail}") from None
        if "error" in answer:
            raise Day2Error(
                f"{self.node.name}: {method} {url}: cannot connect on the node: {answer['error']}"
            )
        headers_out = {k.lower(): v for k, v in answer["headers"].items()}
        return HTTPResult(answer["status"], headers_out, base64.b64decode(answer["body"]))
