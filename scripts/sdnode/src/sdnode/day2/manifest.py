"""What differs between nodes' manifests (/etc/sdserve/manifest.json): flattened to dotted keys, compared
key by key, keys that always differ between nodes (time stamps, host names) left out."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Keys that differ between two correct nodes or two runs of the same build; shown with --all.
DEFAULT_IGNORE = (
    "*generated_at*",
    "*deployed_at*",
    "*built_at*",
    "*timestamp*",
    "*_time",
    "time",
    "*.time",
    "*_at",
    "host",
    "hostname",
    "*.hostname",
    "inventory_hostname",
    "node",
    "*address*",
    "*machine_id*",
    "*boot_id*",
)
# Shown first when they differ: what decides whether two nodes generate the same image.
FIRST = ("release", "kit", "driver", "nvidia", "cuda", "torch", "diffusers", "transformers", "model")
MISSING = "(absent)"


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested JSON as {dotted.key: rendered leaf}; list items by index (lists of scalars kept whole)."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        if not value and prefix:
            out[prefix] = "{}"
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, list) and any(isinstance(item, (Mapping, list)) for item in value):
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
    else:
        out[prefix or "(value)"] = value if isinstance(value, str) else json.dumps(value)
    return out


def ignored(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key.lower(), p.lower()) for p in patterns)


def _rank(key: str) -> tuple[int, str]:
    lowered = key.lower()
    for i, word in enumerate(FIRST):
        if word in lowered:
            return (i, key)
    return (len(FIRST), key)


@dataclass(frozen=True)
class ManifestDiff:
    hosts: list[str]
    rows: list[tuple[str, list[str]]]  # (key, value per host) for every differing key
    compared: int  # keys compared
    ignored: list[str]  # keys left out by the ignore patterns

    @property
    def identical(self) -> bool:
        return not self.rows


def diff_manifests(manifests: Mapping[str, Any], ignore: Iterable[str] = DEFAULT_IGNORE) -> ManifestDiff:
    """Compare the manifests of several hosts ({host: parsed JSON}); rows only for keys that differ."""
    ignore = tuple(ignore)
    hosts = list(manifests)
    flat = {host: flatten(manifests[host]) for host in hosts}
    keys = sorted({k for f in flat.values() for k in f}, key=_rank)
    rows, skipped = [], []
    compared = 0
    for key in keys:
        if ignored(key, ignore):
            skipped.append(key)
            continue
        compared += 1
        values = [flat[h].get(key, MISSING) for h in hosts]
        if len(set(values)) > 1:
            rows.append((key, values))
    return ManifestDiff(hosts, rows, compared, skipped)
