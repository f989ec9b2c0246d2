#!/usr/bin/env python3
"""Download a pinned Hub snapshot into a staging directory (node side, run from the release venv).

    hub_download.py REPO_ID REVISION DEST [--allow PATTERN]... [--variant fp16]

The token comes from the HF_TOKEN environment variable, never from the command line.
"""

import argparse
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo_id")
    ap.add_argument("revision")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--allow", action="append", default=None)
    a = ap.parse_args()
    snapshot_download(repo_id=a.repo_id, revision=a.revision, local_dir=a.dest, allow_patterns=a.allow)
    # huggingface_hub's bookkeeping is not part of the model; the manifest covers only model files.
    shutil.rmtree(a.dest / ".cache", ignore_errors=True)


if __name__ == "__main__":
    main()
