"""API keys: a file of SHA-256 hashes, `sha256:<hex> <name>` a line, `#` comments.

Keys are long and random, so a plain SHA-256 is enough (no slow KDF on every request).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from pathlib import Path

log = logging.getLogger("sdserve.keys")

_LINE = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})\s+(?P<name>[A-Za-z0-9_.@:-]{1,64})$")
MIN_KEY_CHARS = 16


class KeyFileError(ValueError):
    """The message names the file and line."""


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_line(key: str, name: str) -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"key is {len(key)} characters; use at least {MIN_KEY_CHARS} random ones (e.g. `openssl rand -hex 32`)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,64}", name):
        raise ValueError(f"name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ : -")
    return f"{hash_key(key)} {name}"


def parse_key_file(path: Path) -> list[tuple[bytes, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise KeyFileError(f"SDSERVE_API_KEYS_FILE={path}: cannot read ({e.strerror})") from e
    entries: list[tuple[bytes, str]] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise KeyFileError(
                f"{path}:{number}: expected `sha256:<64 hex digits> <name>` (make one with `sdserve hash-key --name NAME`)"
            )
        if m["name"] in names:
            raise KeyFileError(f"{path}:{number}: name {m['name']!r} appears twice; names must be unique")
        names.add(m["name"])
        entries.append((bytes.fromhex(m["hex"]), m["name"]))
    return entries


class KeyStore:
    """The keys in force. Once the service runs with keys it never runs without: a reload that would
    leave no keys (an emptied file, only comments) keeps the keys in force, like a broken file does,
    so a key-file mistake can never open the service. `stale` says the file on disk was refused."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        self.stale: str | None = None  # why the file on disk is not what is in force
        self.reloads: dict[str, int] = {"ok": 0, "kept_old_keys": 0}
        if path is not None:
            self._entries = parse_key_file(path)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). A broken file, or one without keys while keys are in force,
        keeps the old keys and logs why at error level."""
        if self.path is None:
            return False
        try:
            entries = parse_key_file(self.path)
            if not entries and self._entries:
                raise KeyFileError(
                    f"{self.path}: no keys (empty or only comments); refusing to serve without keys"
                )
        except KeyFileError as e:
            self.stale = str(e)
            self.reloads["kept_old_keys"] += 1
            log.error("key file not reloaded, keeping the %d keys in force: %s", len(self._entries), e)
            return False
        with self._lock:
            self._entries = entries
        self.stale = None
        self.reloads["ok"] += 1
        log.info("key file reloaded: %d keys", len(entries))
        return True

    def lookup(self, key: str) -> str | None:
        """The key's name, or None. Compares against every entry in constant time."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        with self._lock:
            entries = self._entries
        for stored, name in entries:
            if hmac.compare_digest(stored, digest) and found is None:
                found = name
        return found
