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
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        if path is not None:
            self._entries = parse_key_file(path)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> bool:
        """Re-read the file (SIGHUP). A broken file keeps the old keys and logs why."""
        if self.path is None:
            return False
        try:
            entries = parse_key_file(self.path)
        except KeyFileError as e:
            log.error("key file not reloaded, keeping %d keys: %s", len(self._entries), e)
            return False
        with self._lock:
            self._entries = entries
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
