#!/usr/bin/python3
"""Wait until an sdserve instance answers /readyz with 200, or give up early when systemd has given up.

    wait_ready.py URL UNIT TIMEOUT_S

Exit 0: ready. Exit 1: the unit failed (or kept crashing), or TIMEOUT_S passed; the reason goes to stderr.
Runs with the system python3, so it does not depend on the release it checks.
"""

import subprocess
import sys
import time
import urllib.error
import urllib.request

CRASH_LOOP = 3  # automatic restarts since the deploy's own (re)start: the release is not going to come up


def unit_state(unit: str) -> dict:
    out = subprocess.run(
        ["systemctl", "show", unit, "--property=ActiveState,SubState,NRestarts,Result"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main() -> int:
    url, unit, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    # Restarts counted before this wait (a previous release's crash loop) are not this release's.
    baseline = int(unit_state(unit).get("NRestarts", "0") or 0)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    print(f"{unit}: ready")
                    return 0
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read(300).decode(errors='replace')}"
        except OSError as e:
            last = str(e)
        state = unit_state(unit)
        restarts = int(state.get("NRestarts", "0") or 0) - baseline
        if state.get("ActiveState") == "failed" or restarts >= CRASH_LOOP:
            print(f"{unit}: not ready, systemd reports {state} (last probe: {last})", file=sys.stderr)
            return 1
        time.sleep(2)
    print(f"{unit}: not ready after {timeout:.0f}s (last probe: {last})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
