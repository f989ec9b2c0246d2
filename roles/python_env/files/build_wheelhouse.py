#!/usr/bin/env python3
"""Fill a wheelhouse for one lock on the controller and pack it as a tar for the nodes.

    build_wheelhouse.py LOCK PYVER(e.g. 311) WHEELHOUSE_DIR [--find-links DIR]...

Downloads into WHEELHOUSE_DIR/<lock name>-<lock sha256[:12]>/ (wheels, checked against the lock's
hashes), packs them as <same>.tar beside it and keeps only the tar; does nothing when the tar exists.
Prints {"tar": ..., "changed": ...}.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# Tags a glibc 2.28+ x86_64 node accepts; pip download needs them spelled out to fetch for another host,
# every one of them: NVIDIA's CUDA wheels are tagged manylinux_2_25, for one.
PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("lock", type=Path)
    ap.add_argument("pyver")
    ap.add_argument("wheelhouse", type=Path)
    ap.add_argument("--find-links", action="append", default=[])
    a = ap.parse_args()
    key = hashlib.sha256(a.lock.read_bytes()).hexdigest()[:12]
    name = f"{a.lock.name.removesuffix('.txt')}-{key}"
    tar = a.wheelhouse / f"{name}.tar"
    if tar.exists():
        print(json.dumps({"tar": str(tar), "changed": False}))
        return 0
    dest = a.wheelhouse / name
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--require-hashes",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        a.pyver,
        "--implementation",
        "cp",
        "-r",
        str(a.lock),
        "-d",
        str(dest),
    ]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    for link in a.find_links:
        cmd += ["--find-links", link]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    (dest / ".complete").write_text(f"{a.lock.name} {key}\n")
    part = tar.with_suffix(".tar.part")
    with tarfile.open(part, "w") as tf:
        # .complete goes last: a node that unpacked only part of the tar never sees it.
        for f in sorted(p for p in dest.iterdir() if p.name != ".complete"):
            tf.add(f, arcname=f.name)
        tf.add(dest / ".complete", arcname=".complete")
    part.rename(tar)
    # The tar is what nodes get; the download beside it would double the cache (3 GB for a CUDA lock).
    shutil.rmtree(dest)
    print(json.dumps({"tar": str(tar), "changed": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
