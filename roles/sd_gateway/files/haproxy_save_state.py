"""Saves a gateway's runtime server states (an operator's drain, a rolling deploy's maintenance, the
checks' verdicts) where the next HAProxy process loads them (`server-state-file`). The unit runs it
after the new configuration passed its check and just before HAProxy re-reads it, and at stop.

HAProxy applies a state line's port (and its check and agent ports) over the configuration's, with no
option against it; only a literal address is always the configuration's. So a line is kept only while
the configuration about to be loaded still names that server at that address and port, and without
the optional fields 21-25 (ssl, check and agent addresses and ports), so the configuration's win.

Usage: haproxy_save_state.py ADMIN_SOCKET CONFIG STATE_FILE
"""

import os
import re
import socket
import sys
from pathlib import Path

SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program)\b\s*(\S*)")
SERVER = re.compile(r"^\s+server\s+(\S+)\s+(\S+)")
FIELDS = 20  # be_id .. srvrecord: the ones `show servers state` always writes (format version 1)


def configured(config: str) -> dict[tuple[str, str], tuple[str, str]]:
    """{(backend, server): (address, port)} of the configuration's literal `server` lines."""
    servers, backend = {}, ""
    for line in config.splitlines():
        if section := SECTION.match(line):
            backend = section.group(2) if section.group(1) in ("backend", "listen") else ""
        elif backend and (server := SERVER.match(line)):
            address, _, port = server.group(2).rpartition(":")
            servers[(backend, server.group(1))] = (address.strip("[]"), port)
    return servers


def kept(dump: str, servers: dict[tuple[str, str], tuple[str, str]]) -> str:
    """The lines of a `show servers state` dump that still describe the configured servers, cut to the
    first 20 fields; empty when the dump is not format version 1."""
    lines = dump.splitlines()
    if not lines or lines[0].strip() != "1":
        return ""
    out = ["1"]
    for line in lines[1:]:
        fields = line.split()
        if line.startswith("#") or len(fields) < FIELDS:
            continue
        backend, server, address, port = fields[1], fields[3], fields[4], fields[18]
        if servers.get((backend, server)) == (address, port):
            out.append(" ".join(fields[:FIELDS]))
    return "\n".join(out) + "\n"


def dump_states(admin_socket: str) -> str:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(admin_socket)
    sock.sendall(b"show servers state\n")
    return b"".join(iter(lambda: sock.recv(65536), b"")).decode()


def main(admin_socket: str, config: str, state_file: str) -> None:
    try:
        text = kept(dump_states(admin_socket), configured(Path(config).read_text()))
    except Exception:
        # No states rather than an older save's: those may undo a later undrain, and were checked
        # against an older configuration.
        Path(state_file).unlink(missing_ok=True)
        raise
    # Never a half-written file: HAProxy drops a whole file with one bad line.
    tmp = Path(f"{state_file}.new")
    with tmp.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, state_file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
