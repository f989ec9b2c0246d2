#!/usr/bin/env python3
"""Download a pinned Hub snapshot into a staging directory (node side, run from the release venv).

    hub_download.py REPO_ID REVISION DEST [--allow PATTERN]... [--ignore PATTERN]... [--variant fp16]
                    [--plan]

The files are chosen from the commit's listing before anything is fetched: those the allow patterns
match and the ignore patterns do not; and in each component directory one set of weights, the
variant's (`*.fp16.safetensors`) where the directory has them, else the plain ones. That is the set
diffusers loads with `variant="fp16"` (it falls back to plain weights per component), and for a
typical SD 1.x repository a fifth of what `*/*.safetensors` fetches.

The Hub's address comes from HF_ENDPOINT and the token from HF_TOKEN, never from the command line.
On success it prints one JSON line: the full commit, the file count and bytes. With `--plan` that
line is all it does (the role sizes its disk check and progress reports with it). A failure prints
one line naming the Hub's error (the token is never in it) and exits 1.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import posixpath
import re
import shutil
import sys
from pathlib import Path

WEIGHTS = re.compile(r"\.(safetensors|bin)(\.index(\.[a-z0-9_]+)?\.json)?$")
# Tags diffusers and transformers put before the suffix of a weights variant (incl. shards).
VARIANT_TAG = re.compile(r"\.(fp16|fp32|bf16|non_ema|ema_only)(?=[.-])")


def variant_of(name: str) -> str:
    """'' for plain weights, else the variant tag: model.fp16.safetensors -> fp16,
    diffusion_pytorch_model.safetensors.index.fp16.json -> fp16."""
    index = re.search(r"\.index\.([a-z0-9_]+)\.json$", name)
    if index:
        return index.group(1)
    tag = VARIANT_TAG.search(name)
    return tag.group(1) if tag else ""


def select(paths: list[str], allow: list[str], ignore: list[str], variant: str) -> list[str]:
    """The files to fetch, sorted (see the module's docstring)."""
    kept = [
        p
        for p in paths
        if any(fnmatch.fnmatch(p, a) for a in allow) and not any(fnmatch.fnmatch(p, i) for i in ignore)
    ]
    weights_by_dir: dict[str, list[str]] = {}
    for p in kept:
        if WEIGHTS.search(p):
            weights_by_dir.setdefault(posixpath.dirname(p), []).append(p)
    drop: set[str] = set()
    for files in weights_by_dir.values():
        have = {variant_of(posixpath.basename(f)) for f in files}
        want = variant if variant in have else ("" if "" in have else sorted(have)[0])
        drop |= {f for f in files if variant_of(posixpath.basename(f)) != want}
    return sorted(p for p in kept if p not in drop)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo_id")
    ap.add_argument("revision")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--allow", action="append", default=[])
    ap.add_argument("--ignore", action="append", default=[])
    ap.add_argument("--variant", default="")
    ap.add_argument("--plan", action="store_true", help="list and size the files, download nothing")
    a = ap.parse_args()
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    try:
        api = HfApi()
        commit = api.repo_info(a.repo_id, revision=a.revision).sha  # the commit the Hub has, as it names it
        listing = {
            f.path: f.size
            for f in api.list_repo_tree(a.repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        files = select(sorted(listing), a.allow or ["*"], a.ignore, a.variant)
        if "model_index.json" not in files:
            raise LookupError(f"no model_index.json among the chosen files {files}; a diffusers repository?")
        if not a.plan:
            snapshot_download(repo_id=a.repo_id, revision=commit, local_dir=a.dest, allow_patterns=files)
    except Exception as e:  # the Hub's errors are many types; the operator needs the message
        message = " ".join(str(e).split())
        print(f"hub_download: {a.repo_id}@{a.revision}: {type(e).__name__}: {message}", file=sys.stderr)
        return 1
    # huggingface_hub's bookkeeping is not part of the model; the manifest covers only model files.
    shutil.rmtree(a.dest / ".cache", ignore_errors=True)
    print(json.dumps({"commit": commit, "files": len(files), "bytes": sum(listing[f] for f in files)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
