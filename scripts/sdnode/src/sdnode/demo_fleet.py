"""`make demo-fleet`: a fleet on local throwaway nodes. Two serving nodes (CPU, tiny model) and one host
that is both the gateway (HAProxy, TLS) and the monitor (Prometheus, Alertmanager), all Debian 12.

Phases: nodes up -> tiny model -> site.yml -> one image through the gateway and Prometheus asked
from the controller. It prints the gateway URL, the API key file and the Prometheus URL, and writes
them to <state>/demo-fleet/endpoints.json. A second run reuses the nodes and changes nothing.
`--clean` removes the three nodes.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sdnode.day2.service import generated_key_path
from sdnode.demo import phases_after_setup, run
from sdnode.localinv import build_inventory, venv_tool
from sdnode.state import find_repo_root, state_dir

NODES = ["fleet1", "fleet2"]
GATEWAY = "fleetgw"  # also the monitor host
PROMETHEUS_PORT = 9090  # sdnode_prometheus_port (roles/sdnode/defaults/main.yml)


def endpoints(state: Path, inventory: Path, gateway_address: str) -> dict[str, str]:
    """What a client of the fleet needs, all answering from this controller."""
    return {
        "gateway_url": f"https://{gateway_address}",
        "api_key_file": str(generated_key_path(state, NODES[0], {}, fleet=True)),
        "ca_file": str(state / "gateway-tls" / "ca.crt"),
        "prometheus_url": f"http://{gateway_address}:{PROMETHEUS_PORT}",
        "prometheus_basic_auth_file": str(state / "monitor" / "prometheus.basic-auth"),
        "inventory": str(inventory),
    }


def check(found: dict[str, str]) -> tuple[str, str]:
    """One image through the gateway and Prometheus's target health; one line each."""
    key = Path(found["api_key_file"]).read_text().strip()
    with httpx.Client(verify=found["ca_file"], timeout=120) as http:
        response = http.post(
            found["gateway_url"] + "/v1/images/generations",
            headers={"Authorization": f"Bearer {key}"},
            json={"prompt": "a lighthouse at dawn", "size": "64x64", "response_format": "b64_json"},
        )
        response.raise_for_status()
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
        served = response.headers.get("X-SDNode-Server", "?")
    user, _, password = Path(found["prometheus_basic_auth_file"]).read_text().strip().partition(":")
    # A Prometheus just (re)started has not scraped yet: wait for its first round, a minute at most.
    deadline = time.monotonic() + 60
    while True:
        targets = httpx.get(found["prometheus_url"] + "/api/v1/targets", auth=(user, password), timeout=30)
        active = targets.raise_for_status().json()["data"]["activeTargets"]
        up = sum(t["health"] == "up" for t in active)
        if (active and up == len(active)) or time.monotonic() > deadline:
            break
        time.sleep(2)
    return (
        f"gateway: a {len(png)}-byte PNG through {found['gateway_url']}, served by {served}",
        f"prometheus: {up}/{len(active)} targets up at {found['prometheus_url']}",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdnode-demo-fleet", description=__doc__)
    parser.add_argument("--clean", action="store_true", help="remove the fleet's nodes")
    args = parser.parse_args(argv)
    repo = find_repo_root()
    if repo is None:
        sys.exit("demo-fleet: run it from the sdnode checkout (make demo-fleet)")
    state = state_dir()
    names = [*NODES, GATEWAY]
    if args.clean:
        for name in names:
            run([venv_tool("testnode"), "down", name], repo)
        (state / "demo-fleet" / "endpoints.json").unlink(missing_ok=True)
        print(f"demo fleet {', '.join(names)} removed; controller state stays in {state}")
        return

    phases = phases_after_setup()
    with phases.phase(f"three throwaway nodes: {', '.join(NODES)} serving, {GATEWAY} gateway and monitor"):
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            codes = list(
                pool.map(
                    lambda n: subprocess.run([venv_tool("testnode"), "up", n], cwd=repo).returncode, names
                )
            )
        failed = [name for name, code in zip(names, codes, strict=True) if code != 0]
        if failed:
            sys.exit(f"demo-fleet: `testnode up` failed for {', '.join(failed)}")
    with phases.phase("tiny model on the controller"):
        model = state / "models" / "tiny"
        if not (model / "model_index.json").exists():
            run([venv_tool("sdserve"), "make-tiny-model", str(model)], repo)
    inventory = build_inventory(
        state / "demo-fleet" / "inventory",
        NODES,
        repo / "inventory.local" / "group_vars",
        fleet={"sdgateways": [GATEWAY], "sdmonitor": [GATEWAY]},
    )
    out = state / "demo-fleet" / "endpoints.json"
    with phases.phase("site.yml: nodes, then the gateway and the monitor"):
        # The first rollout has nothing to keep serving: every host at once. Later runs roll a node at a
        # time (the inventory's sdnode_serial), drained at the gateway.
        first = ["-e", "sdnode_serial=100%"] if not out.exists() else []
        run([venv_tool("ansible-playbook"), "-i", str(inventory), "playbooks/site.yml", *first], repo)
    hosts = json.loads(
        subprocess.run(
            [venv_tool("ansible-inventory"), "-i", str(inventory), "--host", GATEWAY],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    found = endpoints(state, inventory, hosts["ansible_host"])
    out.write_text(json.dumps(found, indent=2) + "\n")
    with phases.phase("an image through the gateway, Prometheus from the controller"):
        lines = check(found)
    print("\n" + "\n".join(lines))
    print("\n".join(["", "timings:", *(f"  {title}: {seconds:.1f}s" for title, seconds in phases.timings)]))
    print(
        f"\nThe fleet ({out}):\n"
        f"  gateway     {found['gateway_url']}  (CA: {found['ca_file']})\n"
        f"  API key     {found['api_key_file']}\n"
        f"  Prometheus  {found['prometheus_url']}  (user:password in {found['prometheus_basic_auth_file']})\n"
        f"  inventory   {found['inventory']}\n"
        f'Try: curl --cacert {found["ca_file"]} -H "Authorization: Bearer $(cat {found["api_key_file"]})" '
        f"{found['gateway_url']}/v1/models\n"
        f"     .venv/bin/sdnode status -i {found['inventory']}\n"
        "Remove it with: make demo-fleet-clean"
    )


if __name__ == "__main__":
    main()
