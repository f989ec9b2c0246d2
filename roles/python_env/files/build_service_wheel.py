#!/usr/bin/env python3
"""Build the service wheel on the controller and print its content digest as JSON.

The digest hashes each archive member's name and bytes (not the zip's timestamps), so the same
source gives the same release id on every run and every controller.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def content_digest(wheel: Path) -> str:
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            h.update(name.encode() + b"\0" + hashlib.sha256(zf.read(name)).digest())
    return h.hexdigest()


def source_files(src: Path) -> list[Path]:
    """What goes into the wheel, sorted: pyproject, README and the package sources."""
    files = [src / "pyproject.toml", src / "README.md", *(src / "src").rglob("*")]
    kept = (f for f in files if f.is_file() and "__pycache__" not in f.parts and ".egg-info" not in str(f))
    return sorted(kept)


def source_digest(src: Path) -> str:
    """Digest of what goes into the wheel: an unchanged tree reuses the wheel built from it."""
    h = hashlib.sha256()
    for p in source_files(src):
        h.update(p.relative_to(src).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def local_backend_ok() -> bool:
    """The controller's own setuptools (from the hash-checked lock) builds the wheel when it is
    new enough: no download of a build backend, so the build works offline and is the same on
    every controller. Otherwise pip fetches one into an isolated build environment."""
    try:
        from importlib.metadata import version

        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # not installed, or an odd version string
        return False


def main() -> int:
    src, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    if not (src / "pyproject.toml").is_file():
        print(f"build_service_wheel: no pyproject.toml in {src}", file=sys.stderr)
        return 2
    memo = out / "by-source" / f"{source_digest(src)}.json"
    if memo.is_file():
        cached = json.loads(memo.read_text())
        if Path(cached["path"]).is_file():
            print(json.dumps(cached))
            return 0
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"]
    if local_backend_ok():
        build.append("--no-build-isolation")
    with tempfile.TemporaryDirectory() as tmp:
        # Built from a clean copy of exactly what the source digest covers: no build/ or
        # egg-info left in the tree, and none of theirs (stale modules) in the wheel.
        clean = Path(tmp) / "src"
        for f in source_files(src):
            (clean / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, clean / f.relative_to(src))
        subprocess.run(
            [*build, "--wheel-dir", tmp, str(clean)],
            check=True,
            env=env,
            stdout=sys.stderr,
        )
        (built,) = Path(tmp).glob("*.whl")
        digest = content_digest(built)
        dest_dir = out / digest[:16]
        dest = dest_dir / built.name
        if not dest.exists():  # same content: keep the first file, so its bytes (and sha256) stay put
            dest_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built), dest)
    sha = hashlib.sha256(dest.read_bytes()).hexdigest()
    result = json.dumps({"path": str(dest), "name": dest.name, "digest": digest, "sha256": sha})
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
