#!/usr/bin/env python3
"""Download a pinned Hub snapshot into a staging directory (node side, run from the release venv).

    hub_download.py REPO_ID REVISION DEST [--allow PATTERN]...

The Hub's address comes from HF_ENDPOINT and the token from HF_TOKEN, never from the command line.
A failure prints one line naming the Hub's error (the token is never in it) and exits 1.
"""

import argparse
import shutil
import sys
from pathlib import Path

from huggingface_hub import snapshot_download


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo_id")
    ap.add_argument("revision")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--allow", action="append", default=None)
    a = ap.parse_args()
    try:
        snapshot_download(repo_id=a.repo_id, revision=a.revision, local_dir=a.dest, allow_patterns=a.allow)
    except Exception as e:  # the Hub's errors are many types; the operator needs the message
        message = " ".join(str(e).split())
        print(f"hub_download: {a.repo_id}@{a.revision}: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    # huggingface_hub's bookkeeping is not part of the model; the manifest covers only model files.
    shutil.rmtree(a.dest / ".cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
