#!/usr/bin/env python3
"""Print, as JSON, the index entry of the newest version of a package in an apt Packages(.gz) file.

Usage: newest-package.py PACKAGES_FILE PACKAGE. Versions are compared by dpkg itself.
"""

import gzip
import json
import subprocess
import sys


def newer(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0


def main() -> int:
    path, package = sys.argv[1], sys.argv[2]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as index:
        stanzas = index.read().split("\n\n")
    best = None
    for stanza in stanzas:
        fields = {}
        for line in stanza.splitlines():
            if line and not line.startswith(" ") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") == package and (best is None or newer(fields["Version"], best["Version"])):
            best = fields
    if best is None:
        print(f"{package} is not in {path}", file=sys.stderr)
        return 1
    print(json.dumps({k: best.get(k, "") for k in ("Package", "Version", "Filename", "SHA256")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
