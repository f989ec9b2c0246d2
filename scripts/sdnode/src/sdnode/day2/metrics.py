"""The few figures `sdnode status` shows, read from an instance's Prometheus /metrics text."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Names the service exports (service/src/sdserve/metrics.py); counters' samples carry `_total`.
QUEUE_DEPTH = "sdserve_queue_depth"
IMAGES = "sdserve_images_total"
READY = "sdserve_ready"
KEYS = "sdserve_api_keys"
KEYS_STALE = "sdserve_api_keys_file_stale"


@dataclass(frozen=True)
class ServiceFigures:
    queue_depth: float | None = None
    images: float | None = None  # summed over the per-key label
    ready: float | None = None
    keys: float | None = None  # API keys in force
    keys_stale: float | None = None  # 1: the last reload refused the key file


def sample_sums(text: str) -> dict[str, float]:
    """Every sample name in `text` with its values summed over all label sets; a declared family
    without samples yet (a labelled counter before its first increment) counts as 0."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.samples:
            suffix = "_total" if family.type == "counter" else ""
            sums.setdefault(family.name + suffix, 0.0)
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def parse_figures(text: str) -> ServiceFigures:
    """Queue depth, images served, readiness and the key file's state from a /metrics body;
    ValueError if not Prometheus text."""
    sums = sample_sums(text)
    return ServiceFigures(
        sums.get(QUEUE_DEPTH), sums.get(IMAGES), sums.get(READY), sums.get(KEYS), sums.get(KEYS_STALE)
    )


def fmt_number(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
