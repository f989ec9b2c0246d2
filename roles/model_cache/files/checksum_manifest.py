#!/usr/bin/env python3
"""Print a sha256sum-style manifest of a model directory (controller side) as JSON.

    checksum_manifest.py DIR [DIR...]  ->  {"DIR": {"manifest": "...", "bytes": N, "files": N}, ...}

Paths are relative and sorted, so `sha256sum -c` on the node checks the same list byte for byte.
"""

import hashlib
import json
import sys
from pathlib import Path

MANIFEST = "sdnode-checksums.sha256"


def manifest(root: Path) -> dict:
    if not (root / "model_index.json").is_file():
        raise SystemExit(f"checksum_manifest: {root} has no model_index.json (not a diffusers pipeline)")
    lines, total = [], 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel == MANIFEST or rel.startswith(".cache/"):
            continue
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        lines.append(f"{h.hexdigest()}  ./{rel}\n")
        total += p.stat().st_size
    return {"manifest": "".join(lines), "bytes": total, "files": len(lines)}


if __name__ == "__main__":
    print(json.dumps({d: manifest(Path(d)) for d in sys.argv[1:]}))
