"""The fleet's SSH key pair: `$STATE/keys/sdnode_ed25519` (0600, OpenSSH format) and its `.pub`."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sdnode.day2 import Day2Error

KEY_NAME = "sdnode_ed25519"


def fleet_key_path(state: Path) -> Path:
    return state / "keys" / KEY_NAME


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a fresh temp file with `mode` from the start, then move it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # umask cannot widen it, but may have narrowed a public key's 0644
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_key_pair(private: Path, comment: str = "sdnode-fleet", force: bool = False) -> tuple[Path, str]:
    """Write a new ed25519 pair at `private` (0600) and `private`.pub (0644); return the public line.
    Refuses to replace an existing pair unless `force`: every node trusting it would be locked out."""
    public = private.with_name(private.name + ".pub")
    existing = [p for p in (private, public) if p.exists()]
    if existing and not force:
        raise Day2Error(
            f"{existing[0]} already exists; nodes may trust it. Use --force to replace it "
            f"(then re-run bootstrap or the deploy on every node)"
        )
    private.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" {comment}"
    )
    _write_new(private, private_bytes, 0o600)
    _write_new(public, (public_line + "\n").encode(), 0o644)
    return public, public_line


def read_public_key(private: Path) -> str:
    public = private.with_name(private.name + ".pub")
    if not public.exists():
        raise Day2Error(f"no public key at {public}; create the fleet key with `sdnode keys`")
    line = public.read_text().strip()
    if not line.startswith("ssh-"):
        raise Day2Error(f"{public} does not hold an OpenSSH public key")
    return line
