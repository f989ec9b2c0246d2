#!/usr/bin/env python3
"""Hash a model directory on the controller and pack it for the nodes.

    checksum_manifest.py TAR_DIR DIR [DIR...]
      -> {"DIR": {"manifest": "...", "bytes": N, "files": N, "tar": "TAR_DIR/<name>-<key>.tar"}, ...}

The manifest is sha256sum's format with sorted relative paths, so `sha256sum -c` on the node checks
the same list. The tar (one transfer instead of one per file) is written once per manifest.
"""

import hashlib
import json
import sys
import tarfile
from pathlib import Path

MANIFEST = "sdnode-checksums.sha256"


def files_of(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.relative_to(root).as_posix() != MANIFEST
        and ".cache" not in p.relative_to(root).parts
    )


def manifest(root: Path, tar_dir: Path) -> dict:
    if not (root / "model_index.json").is_file():
        raise SystemExit(f"checksum_manifest: {root} has no model_index.json (not a diffusers pipeline)")
    lines, total = [], 0
    files = files_of(root)
    for p in files:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        lines.append(f"{h.hexdigest()}  ./{p.relative_to(root).as_posix()}\n")
        total += p.stat().st_size
    text = "".join(lines)
    tar = tar_dir / f"{root.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.tar"
    if not tar.exists():
        tar_dir.mkdir(parents=True, exist_ok=True)
        part = tar.with_suffix(".part")
        with tarfile.open(part, "w") as tf:
            for p in files:
                tf.add(p, arcname=p.relative_to(root).as_posix(), recursive=False)
        part.rename(tar)
    return {"manifest": text, "bytes": total, "files": len(lines), "tar": str(tar)}


if __name__ == "__main__":
    tar_dir = Path(sys.argv[1])
    print(json.dumps({d: manifest(Path(d), tar_dir) for d in sys.argv[2:]}))
