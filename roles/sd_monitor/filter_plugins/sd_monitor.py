"""Filters of the sd_monitor role: Prometheus target addresses and the basic-auth bcrypt hash."""

from __future__ import annotations

import bcrypt


def sd_monitor_hostport(address, port):
    """`host:port` as Prometheus writes a target (and its instance label); IPv6 in brackets."""
    host = str(address).strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def sd_monitor_bcrypt(password, current=None, rounds=10):
    """A bcrypt hash of `password`: `current` when it already is one (so re-runs change nothing),
    else a new one with a fresh salt."""
    secret = str(password).encode()
    if current:
        try:
            if bcrypt.checkpw(secret, str(current).encode()):
                return str(current)
        except ValueError:  # not a bcrypt hash: replace it
            pass
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds=int(rounds))).decode()


class FilterModule:
    def filters(self):
        return {"sd_monitor_hostport": sd_monitor_hostport, "sd_monitor_bcrypt": sd_monitor_bcrypt}
