"""`sdnode bootstrap`: take a node that only has password login to key-only login, proving each step.

Password login once -> install the fleet public key (idempotent) -> a fresh key-only login works -> an sshd
drop-in turns password login off (validated by `sshd -t` before reload) -> a password login is refused.
Re-running on a bootstrapped node checks the same end state and changes nothing.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko

from sdnode.day2 import Day2Error
from sdnode.day2.inventory import Node
from sdnode.day2.remote import describe_connect_error, host_key_client

# First match wins in sshd_config, and Debian/Ubuntu include sshd_config.d/*.conf at the top in lexical
# order: "00-" beats cloud-init's 50-cloud-init.conf and anything later that would allow passwords.
DROPIN = Path("/etc/ssh/sshd_config.d/00-sdnode-bootstrap.conf")
DROPIN_TEXT = (
    "# Written by `sdnode bootstrap`: key-only login. The base role keeps this policy.\n"
    "PasswordAuthentication no\n"
    "KbdInteractiveAuthentication no\n"
)
CONNECT_TIMEOUT_S = 15.0
RELOAD_RETRIES = 10  # sshd re-executes on reload; new connections may be refused for a moment


@dataclass
class Step:
    name: str
    changed: bool
    detail: str = ""


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """OpenSSH's StrictHostKeyChecking=accept-new: record an unknown host's key (a changed one is still
    refused by Paramiko before any policy runs)."""

    def __init__(self, known_hosts: Path, log: Callable[[str], None]) -> None:
        self.known_hosts = known_hosts
        self.log = log

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with self.known_hosts.open("a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.log(
            f"accepted new host key {key.get_name()} {key.fingerprint} for {hostname} into {self.known_hosts}"
        )


def _connect(
    node: Node, accept_new: Path | None, log: Callable[[str], None], **credentials: str
) -> paramiko.SSHClient:
    """A connection made with exactly the given credentials: no agent, no other keys."""
    client = host_key_client(node.known_hosts)
    if accept_new is not None:
        client.set_missing_host_key_policy(_AcceptNew(accept_new, log))
    client.connect(
        node.address,
        port=node.port,
        username=node.user,
        look_for_keys=False,
        allow_agent=False,
        timeout=CONNECT_TIMEOUT_S,
        banner_timeout=CONNECT_TIMEOUT_S,
        auth_timeout=CONNECT_TIMEOUT_S,
        **credentials,
    )
    return client


def password_client(
    node: Node, password: str, accept_new: Path | None = None, log: Callable[[str], None] = print
) -> paramiko.SSHClient:
    """A connection made with the password only."""
    return _connect(node, accept_new, log, password=password)


def key_client(
    node: Node, private_key: Path, accept_new: Path | None = None, log: Callable[[str], None] = print
) -> paramiko.SSHClient:
    """A connection made with `private_key` only: no password."""
    return _connect(node, accept_new, log, key_filename=str(private_key))


def execute(
    client: paramiko.SSHClient, command: str, stdin: str | None = None, timeout: float = 120
) -> tuple[int, str, str]:
    chan_in, chan_out, chan_err = client.exec_command(command, timeout=timeout)
    if stdin is not None:
        chan_in.write(stdin)
    chan_in.channel.shutdown_write()
    out = chan_out.read().decode(errors="replace")
    err = chan_err.read().decode(errors="replace")
    return chan_out.channel.recv_exit_status(), out, err


def as_root(node: Node, command: str) -> tuple[str, bool]:
    """(`command` as root, whether sudo reads the password from stdin first)."""
    if node.user == "root":
        return command, False
    return f"sudo -S -p '' -- sh -c {shlex.quote(command)}", True


def _root(
    client: paramiko.SSHClient, node: Node, password: str, command: str, stdin: str = ""
) -> tuple[int, str, str]:
    wrapped, wants_password = as_root(node, command)
    return execute(client, wrapped, (password + "\n" if wants_password else "") + stdin)


def authorized_keys_script(public_line: str) -> str:
    """Shell that appends `public_line` to ~/.ssh/authorized_keys unless present; prints added/present."""
    q = shlex.quote(public_line)
    return (
        'set -e; umask 077; d="$HOME/.ssh"; f="$d/authorized_keys"; mkdir -p "$d"; touch "$f"; '
        f'if grep -qxF -- {q} "$f"; then echo present; else '
        # A file that lacks a final newline would glue our key onto its last line.
        f'if [ -s "$f" ] && [ "$(tail -c1 "$f" | od -An -c | tr -d " ")" != "\\n" ]; then echo >> "$f"; fi; '
        f'printf "%s\\n" {q} >> "$f"; echo added; fi; chmod 700 "$d"; chmod 600 "$f"'
    )


def _expect_password_refused(node: Node, password: str) -> None:
    for attempt in range(RELOAD_RETRIES):
        try:
            client = password_client(node, password)
        except paramiko.AuthenticationException:
            return  # includes BadAuthenticationType: the server no longer offers "password"
        except (TimeoutError, paramiko.SSHException, OSError):
            time.sleep(0.5 * (attempt + 1))  # sshd re-executing after the reload
            continue
        client.close()
        raise Day2Error(
            f"{node.name}: a password login still succeeds after the reload; check `sshd -T` on the node"
        )
    raise Day2Error(f"{node.name}: cannot reconnect to {node.address}:{node.port} after reloading sshd")


def install_dropin(client: paramiko.SSHClient, node: Node, password: str) -> bool:
    """Write DROPIN unless it already holds DROPIN_TEXT; `sshd -t` before reload, the old state back on
    failure. True when it changed something."""
    rc, current, _ = _root(client, node, password, f"cat {DROPIN} 2>/dev/null || true")
    if rc == 0 and current == DROPIN_TEXT:
        return False
    backup = f"{DROPIN}.sdnode-previous"
    script = (
        f"set -e; SSHD=$(command -v sshd || echo /usr/sbin/sshd); mkdir -p {DROPIN.parent}; "
        f"if [ -e {DROPIN} ]; then cp -p {DROPIN} {backup}; else rm -f {backup}; fi; "
        f"cat > {DROPIN}.tmp; chmod 0644 {DROPIN}.tmp; mv {DROPIN}.tmp {DROPIN}; "
        f"if ! out=$($SSHD -t 2>&1); then "
        f"  if [ -e {backup} ]; then mv {backup} {DROPIN}; else rm -f {DROPIN}; fi; "
        f'  echo "sshd -t: $out" >&2; exit 3; fi; rm -f {backup}'
    )
    rc, _, err = _root(client, node, password, script, DROPIN_TEXT)
    if rc != 0:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        raise Day2Error(f"{node.name}: could not write {DROPIN} (rc={rc}): {last}")
    return True


def check_effective(client: paramiko.SSHClient, node: Node, password: str) -> None:
    """sshd's effective settings must say no password (an earlier Include or main-config line would win)."""
    rc, out, err = _root(client, node, password, "$(command -v sshd || echo /usr/sbin/sshd) -T 2>&1")
    settings = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    if rc != 0 or not settings:
        raise Day2Error(f"{node.name}: `sshd -T` failed: {(err or out).strip()[:200]}")
    for key in ("passwordauthentication", "kbdinteractiveauthentication"):
        if settings.get(key, "no") != "no":
            raise Day2Error(
                f"{node.name}: sshd still has {key} {settings[key]} (set before {DROPIN.parent}/*.conf is "
                f"included, or /etc/ssh/sshd_config lacks that Include); fix the node's sshd_config"
            )


def reload_sshd(client: paramiko.SSHClient, node: Node, password: str) -> None:
    rc, _, err = _root(
        client,
        node,
        password,
        "systemctl reload ssh 2>/dev/null || systemctl reload sshd 2>/dev/null || "
        'kill -HUP "$(cat /run/sshd.pid)"',
    )
    if rc != 0:
        raise Day2Error(f"{node.name}: could not reload sshd: {err.strip()}")


def bootstrap(
    node: Node,
    password: str,
    private_key: Path,
    public_line: str,
    *,
    accept_new: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Step]:
    """Run the sequence on `node`; every step's result, in order. Raises Day2Error on the first failure."""
    steps: list[Step] = []

    def record(name: str, changed: bool, detail: str = "") -> None:
        steps.append(Step(name, changed, detail))
        log(f"{node.name}: {name}: {'changed' if changed else 'ok'}{' - ' + detail if detail else ''}")

    pw: paramiko.SSHClient | None = None
    try:
        pw = password_client(node, password, accept_new, log)
    except paramiko.AuthenticationException:
        pw = None  # already bootstrapped (password refused), or a wrong password: the key tells which
        log(f"{node.name}: password login refused; checking whether the node is already bootstrapped")
    except Exception as exc:  # every failure to connect is told in one line
        message = describe_connect_error(node, exc)
        if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
            message += ", or pass --accept-new-host-key"
        raise Day2Error(message) from None

    if pw is not None:
        try:
            record("password login", False, f"{node.user}@{node.address}")
            rc, out, err = execute(pw, authorized_keys_script(public_line))
            if rc != 0:
                raise Day2Error(f"{node.name}: could not update ~/.ssh/authorized_keys: {err.strip()}")
            record("authorized_keys", out.strip() == "added", f"{public_line.split()[-1]} {out.strip()}")
        finally:
            pw.close()

    try:
        kc = key_client(node, private_key, accept_new, log)
    except paramiko.AuthenticationException:
        if pw is None:
            raise Day2Error(
                f"{node.name}: {node.user}@{node.address} refused both the password and the key {private_key}"
            ) from None
        raise Day2Error(
            f"{node.name}: the key was installed but a key login is refused; password login left on"
        ) from None
    except Exception as exc:
        raise Day2Error(describe_connect_error(node, exc)) from None
    try:
        rc, out, _ = execute(kc, "id -un")
        if rc != 0 or out.strip() != node.user:
            raise Day2Error(f"{node.name}: key login works but `id -un` said {out.strip()!r}")
        record("key-only login", False, f"{private_key.name}")
        changed = install_dropin(kc, node, password)
        record(
            f"sshd drop-in {DROPIN.name}", changed, "validated by sshd -t" if changed else "already in place"
        )
        check_effective(kc, node, password)
        if changed:
            reload_sshd(kc, node, password)
            record("sshd reload", True)
    finally:
        kc.close()
    _expect_password_refused(node, password)
    record("password login refused", False)
    return steps
