"""A bounded load generator for a fleet's gateway: `python -m sdnode.loadgen URL --key-file F`.

Clients send text-to-image requests back to back (no pause) until a request count or a time limit is
reached, or `stop()` is called. Every request is recorded with when it started and ended, its status,
and which instance served it (the gateway's X-SDNode-Server header), so that a test can tell the
requests in flight on an instance at a moment from the rest. Used by the fleet's CI tests and by hand
to load a fleet during a deploy.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

SERVER_HEADER = "X-SDNode-Server"
ROUTE = "/sdapi/v1/txt2img"


@dataclass(frozen=True)
class Sample:
    started: float  # time.monotonic()
    ended: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    server: str  # the instance that answered, as the gateway names it; "" when none
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Summary:
    sent: int
    ok: int
    failed: int
    seconds: float
    p50_s: float
    p95_s: float
    max_s: float
    by_server: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.sent} sent, {self.failed} failed in {self.seconds:.1f} s; "
            f"latency p50 {self.p50_s:.2f} s, p95 {self.p95_s:.2f} s, max {self.max_s:.2f} s; "
            f"by instance {self.by_server}"
        )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class Load:
    """`clients` threads sending requests through `url` until `max_requests` or `max_seconds`."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        ca_file: str | None = None,
        clients: int = 4,
        max_requests: int = 2000,
        max_seconds: float = 300.0,
        size: int = 64,
        steps: int = 2,
        timeout: float = 120.0,
    ) -> None:
        self.url = url.rstrip("/") + ROUTE
        self.headers = {"Authorization": f"Bearer {key}"}
        self.verify: str | bool = ca_file or True
        self.clients = clients
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.body = {"prompt": "load", "steps": steps, "width": size, "height": size, "seed": 1}
        self.timeout = timeout
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._issued = 0
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._issued >= self.max_requests:
                return False
            if time.monotonic() - self.started >= self.max_seconds:
                return False
            self._issued += 1
            return True

    def _client(self) -> None:
        with httpx.Client(verify=self.verify, timeout=self.timeout, headers=self.headers) as http:
            while self._take():
                began = time.monotonic()
                try:
                    response = http.post(self.url, json=self.body)
                    sample = Sample(began, time.monotonic(), response.status_code,
                                    response.headers.get(SERVER_HEADER, ""),
                                    "" if response.status_code == 200 else response.text[:200])  # fmt: skip
                except httpx.HTTPError as exc:
                    sample = Sample(began, time.monotonic(), 0, "", f"{type(exc).__name__}: {exc}"[:200])
                with self._lock:
                    self.samples.append(sample)

    def start(self) -> Load:
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Summary:
        """Stop issuing, wait for the requests in flight, and summarise."""
        self._stop.set()
        return self.wait()

    def wait(self) -> Summary:
        for thread in self._threads:
            thread.join()
        return self.summary()

    def summary(self) -> Summary:
        with self._lock:
            samples = list(self.samples)
        latencies = [s.seconds for s in samples if s.ok]
        by_server: dict[str, int] = {}
        for s in samples:
            if s.ok:
                by_server[s.server] = by_server.get(s.server, 0) + 1
        span = (max(s.ended for s in samples) - self.started) if samples else 0.0
        return Summary(
            sent=len(samples),
            ok=sum(s.ok for s in samples),
            failed=sum(not s.ok for s in samples),
            seconds=span,
            p50_s=percentile(latencies, 50),
            p95_s=percentile(latencies, 95),
            max_s=max(latencies, default=0.0),
            by_server=dict(sorted(by_server.items())),
            failures=[asdict(s) | {"started": s.started - self.started} for s in samples if not s.ok],
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdnode.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the gateway, e.g. https://10.0.0.5")
    parser.add_argument("--key-file", required=True, help="file holding the API key")
    parser.add_argument("--ca-file", help="CA the gateway's certificate chains to")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="most requests in all (default 200)")
    parser.add_argument("--seconds", type=float, default=60.0, help="most seconds (default 60)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="the summary as JSON")
    args = parser.parse_args(argv)
    key = Path(args.key_file).read_text().strip()
    load = Load(args.url, key, ca_file=args.ca_file, clients=args.clients, max_requests=args.requests,
                max_seconds=args.seconds, size=args.size, steps=args.steps).start()  # fmt: skip
    try:
        summary = load.wait()
    except KeyboardInterrupt:
        summary = load.stop()
    print(json.dumps(asdict(summary), indent=2) if args.json else summary.line())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
