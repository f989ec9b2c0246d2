"""The fleet (issue #13), from `make demo-fleet` to losing a node, on three throwaway nodes: two serving
nodes and one gateway-plus-monitor host.

- `make demo-fleet` builds it; a second run changes nothing; endpoints.json's URLs answer from here,
  through the real `openai` client over the gateway's TLS.
- Keys are checked on the nodes behind the gateway; the nodes admit their service ports from the
  gateway and the monitor only; past the queue timeout the gateway answers 503 with Retry-After; async
  jobs are followed on their instance; a gateway reload under load refuses nothing.
- Under continuous load (sdnode.loadgen: bounded, no pause, to the test nodes only):
  (a) a rolling deploy that restarts every instance fails no request, nor does a reboot in provision;
  (b) `sdnode drain`/`undrain` move the traffic and fail nothing;
  (c) a killed instance costs only the requests in flight on it, the gateway stops sending to it,
      and it rejoins once ready.
- Deploying a setting change to every node at once vs to one node: measured, printed, kept in
  .sdnode/logs/fleet-figures.json (no timed assertion).
- The testinfra checks of every host (`make verify`) and of the monitoring: every scrape target up.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from sdnode.loadgen import Load, Summary

from .conftest import (
    LOGS,
    REPO,
    STATE,
    PlaybookRun,
    TestNodes,
    _recorded,
    ansible_playbook,
    assert_converged,
    assert_pytest_passes,
    explain,
    sdnode,
)

pytestmark = pytest.mark.integration

NODES = ("fleet1", "fleet2")
GATEWAY = "fleetgw"
FIGURES = LOGS / "fleet-figures.json"
# The gateway's checks (sd_gateway defaults): out after `fall` failed checks `inter` apart, each
# allowed `timeout check`.
CHECK_WINDOW_S = 2 * 1.0 + 2.0


@dataclass
class Fleet:
    endpoints: dict[str, str]
    inventory: Path
    first: PlaybookRun
    second: PlaybookRun

    @property
    def key(self) -> str:
        return Path(self.endpoints["api_key_file"]).read_text().strip()

    def load(self, **kw) -> Load:
        return Load(self.endpoints["gateway_url"], self.key, ca_file=self.endpoints["ca_file"], **kw)


def record(name: str, figures: dict) -> None:
    """Keep a measurement with the run's logs and show it in pytest's output."""
    LOGS.mkdir(parents=True, exist_ok=True)
    found = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    found[name] = figures
    FIGURES.write_text(json.dumps(found, indent=2))
    print(f"[fleet] {name}: {json.dumps(figures)}")


def server_states(inventory: Path) -> dict[str, str]:
    """Each gateway server's state as `sdnode status --json` reports it: {"fleet1_0": "UP", ...}."""
    proc = sdnode("status", "-i", str(inventory), "--json")
    states = {}
    for node in json.loads(proc.stdout):
        for server in node.get("gateways", []):
            states[server["server"]] = server["state"]
    assert states, explain(proc)
    return states


def server_stat(testnodes: TestNodes, server: str) -> dict[str, str]:
    """Backend sdserve's `show stat` row for `server`, read on the gateway."""
    script = (
        "import csv, json, socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/haproxy/admin.sock'); "
        "s.sendall(b'show stat\\n'); d = b''.join(iter(lambda: s.recv(65536), b'')).decode(); "
        "print(json.dumps([r for r in csv.DictReader(d.lstrip('# ').splitlines()) "
        f"if r['pxname'] == 'sdserve' and r['svname'] == '{server}'][0]))"
    )
    return json.loads(testnodes.ssh(GATEWAY, f'python3 -c "{script}"').stdout)


def last_change_s(testnodes: TestNodes, server: str) -> int:
    """Seconds since `server` last changed state (`lastchg`)."""
    return int(server_stat(testnodes, server)["lastchg"])


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"not within {seconds:.0f} s: {what}")


@pytest.fixture(scope="module")
def fleet(testnodes: TestNodes, tiny_model: Path) -> Iterator[Fleet]:
    """`make demo-fleet` twice, as the README shows it; the nodes are the session's to take down."""
    for name in (*NODES, GATEWAY):
        if name not in testnodes.started:
            testnodes.started.append(name)
    first = _recorded(["make", "--no-print-directory", "demo-fleet"], "demo-fleet", 2400)
    assert_converged(first)
    second = _recorded(["make", "--no-print-directory", "demo-fleet"], "demo-fleet-again", 1200)
    assert_converged(second)
    endpoints = json.loads((STATE / "demo-fleet" / "endpoints.json").read_text())
    yield Fleet(endpoints, Path(endpoints["inventory"]), first, second)


def test_a_second_demo_fleet_changes_nothing(fleet: Fleet) -> None:
    assert set(fleet.second.recap) >= {*NODES, GATEWAY}, fleet.second.explain()
    assert fleet.second.changed == 0, f"changed: {fleet.second.changed_tasks()}\n{fleet.second.explain()}"


def test_endpoints_answer_from_the_controller(fleet: Fleet) -> None:
    found = fleet.endpoints
    assert set(found) >= {"gateway_url", "api_key_file", "prometheus_url", "inventory", "ca_file"}
    assert Path(found["api_key_file"]).stat().st_mode & 0o777 == 0o600
    # The real openai client, unchanged, over the gateway's TLS (verified against the kit's CA).
    client = openai.OpenAI(
        base_url=found["gateway_url"] + "/v1",
        api_key=fleet.key,
        http_client=httpx.Client(verify=found["ca_file"]),
    )
    result = client.images.generate(prompt="a lighthouse", size="64x64", n=2, response_format="b64_json")
    assert len(result.data) == 2 and all(d.b64_json for d in result.data)
    user, _, password = Path(found["prometheus_basic_auth_file"]).read_text().strip().partition(":")
    up = httpx.get(found["prometheus_url"] + "/api/v1/query", params={"query": "up"}, auth=(user, password))
    assert up.status_code == 200 and up.json()["status"] == "success", up.text


def test_keys_are_checked_on_the_nodes_behind_the_gateway(fleet: Fleet) -> None:
    with httpx.Client(verify=fleet.endpoints["ca_file"]) as http:
        url = fleet.endpoints["gateway_url"] + "/v1/models"
        refused = http.get(url)
        wrong = http.get(url, headers={"Authorization": "Bearer not-a-key-of-this-fleet"})
        served = {http.get(url, headers={"Authorization": f"Bearer {fleet.key}"}).headers["X-SDNode-Server"]
                  for _ in range(6)}  # fmt: skip
    for response in (refused, wrong):
        assert response.status_code == 401, response.text
        assert response.headers["X-SDNode-Server"] in {f"{n}_0" for n in NODES}  # the node said no
        assert response.json()["error"]
    # One fleet-wide key: both nodes take it (leastconn with nothing in flight alternates).
    assert served == {f"{n}_0" for n in NODES}


def test_an_async_job_is_followed_on_the_instance_that_runs_it(fleet: Fleet) -> None:
    """Jobs live on one instance: the gateway sends each poll of a job's id to that instance."""
    headers = {"Authorization": f"Bearer {fleet.key}"}
    with httpx.Client(base_url=fleet.endpoints["gateway_url"], verify=fleet.endpoints["ca_file"],
                      headers=headers, timeout=60) as http:  # fmt: skip
        jobs = []
        for _ in range(4):  # leastconn alternates between the two idle instances
            created = http.post("/v1/jobs", json={"prompt": "a job", "size": "64x64", "steps": 30})
            assert created.status_code == 202, created.text
            jobs.append((created.json()["id"], created.headers["X-SDNode-Server"]))
        assert len({server for _, server in jobs}) == 2, jobs  # both instances hold jobs
        for job_id, server in jobs:
            for _ in range(60):
                polled = http.get(f"/v1/jobs/{job_id}")
                assert polled.status_code == 200, (job_id, server, polled.text)
                assert polled.headers["X-SDNode-Server"] == server
                if polled.json()["status"] in ("succeeded", "failed"):
                    break
                time.sleep(0.2)
            assert polled.json()["status"] == "succeeded", polled.text


def test_nodes_admit_the_service_only_from_the_gateway(fleet: Fleet, testnodes: TestNodes) -> None:
    listing = json.loads(
        subprocess.run(
            [str(REPO / ".venv/bin/ansible-inventory"), "-i", str(fleet.inventory), "--list"],
            capture_output=True, text=True, check=True,
        ).stdout
    )["_meta"]["hostvars"]  # fmt: skip
    for node in NODES:
        node_address = listing[node]["ansible_host"]
        with pytest.raises(OSError):  # dropped by the node's firewall: the connect times out
            socket.create_connection((node_address, 7860), timeout=3).close()
        probe = testnodes.ssh(
            GATEWAY,
            f"python3 -c \"import urllib.request as u; print(u.urlopen('http://{node_address}:7860/readyz').status)\"",
        )
        assert probe.stdout.strip() == "200", probe.stderr


def test_a_rolling_deploy_under_load_fails_no_request(fleet: Fleet) -> None:
    load = fleet.load(clients=4, max_requests=20000, max_seconds=900).start()
    time.sleep(2)
    run = ansible_playbook(
        "deploy.yml",
        fleet.inventory,
        extra_vars={"sd_service_settings": {"BATCH_WAIT_MS": 7}, "sdnode_serial": 1},
        label="fleet-rolling-deploy",
    )
    time.sleep(2)
    summary = load.stop()
    assert_converged(run)
    record("rolling_deploy_under_load", summary_figures(summary) | {"deploy_s": round(run.seconds, 1)})
    # Every instance restarted, one node at a time, each drained at the gateway first.
    for node in NODES:
        assert run.recap[node]["changed"] > 0, run.explain()
    drained = [
        t
        for t in run.changed_tasks()
        if t.endswith("Rotation | No new request for them at any gateway (DRAIN)")
    ]
    assert len(drained) == len(NODES), run.explain()
    assert summary.failed == 0, summary.failures[:10]
    assert summary.sent > 100 and set(summary.by_server) == {f"{n}_0" for n in NODES}, summary.line()


def test_reboots_in_provision_under_load_fail_no_request(fleet: Fleet, testnodes: TestNodes) -> None:
    """base reboots the nodes that ask for it after an upgrade, a node at a time: each drained at the
    gateway first and back once ready, so the fleet always has an instance serving."""
    for node in NODES:
        testnodes.ssh(node, "touch /var/run/reboot-required")
    load = fleet.load(clients=4, max_requests=20000, max_seconds=600).start()
    time.sleep(2)
    run = ansible_playbook(
        "provision.yml", fleet.inventory, tags="base", extra_vars={"sdnode_serial": 1}, label="fleet-reboot"
    )
    time.sleep(2)
    summary = load.stop()
    assert_converged(run)
    # Both rebooted, one after the other, each drained first; the second only once the first served again.
    rebooted = [t for t in run.changed_tasks() if t.endswith("Packages | Reboot and wait for the node")]
    assert len(rebooted) == len(NODES), run.explain()
    record("reboot_under_load", summary_figures(summary) | {"provision_s": round(run.seconds, 1)})
    assert summary.failed == 0, summary.failures[:10]
    assert set(summary.by_server) == {f"{n}_0" for n in NODES}, summary.line()


def test_drain_and_undrain_move_the_traffic_and_fail_nothing(fleet: Fleet, testnodes: TestNodes) -> None:
    """An operator's drain holds, through a reload and a restart of the gateway, until undrain."""
    try:
        drain_reload_undrain_under_load(fleet, testnodes)
        # A restart (not under load: it drops connections) keeps the state set since the reload,
        # whichever it is: saved at stop, loaded, then the file is gone (the reload's save says DRAIN).
        for wanted in ("undrain", "drain"):
            assert sdnode(wanted, NODES[0], "-i", str(fleet.inventory)).returncode == 0
            testnodes.ssh(GATEWAY, "systemctl restart haproxy")
            state = wait_for(lambda: server_states(fleet.inventory)[f"{NODES[0]}_0"], 30, "the gateway back")
            assert state == ("DRAIN" if wanted == "drain" else "UP"), (wanted, state)
            gone = testnodes.ssh(GATEWAY, "test ! -e /var/lib/haproxy/server-state", check=False)
            assert gone.returncode == 0, "the loaded server states are still there"
    finally:
        sdnode("undrain", NODES[0], "-i", str(fleet.inventory))  # drains outlive a failed test now


def drain_reload_undrain_under_load(fleet: Fleet, testnodes: TestNodes) -> None:
    inv, drained_server = str(fleet.inventory), f"{NODES[0]}_0"
    load = fleet.load(clients=4, max_requests=20000, max_seconds=300).start()
    try:
        time.sleep(2)
        drained = sdnode("drain", NODES[0], "-i", inv)
        assert drained.returncode == 0, explain(drained)
        after_drain = time.monotonic()
        time.sleep(2)
        # A reload is a new HAProxy process: it keeps the drain only through the saved server states.
        testnodes.ssh(GATEWAY, "systemctl reload haproxy")
        time.sleep(2)
        assert server_states(fleet.inventory)[drained_server] == "DRAIN"
        undraining = time.monotonic()
        undrained = sdnode("undrain", NODES[0], "-i", inv)
        assert undrained.returncode == 0, explain(undrained)
        back = time.monotonic()
        time.sleep(4)
    finally:
        summary = load.stop()
    assert summary.failed == 0, summary.failures[:10]
    while_out = [s for s in load.samples if s.started > after_drain and s.ended < undraining]
    assert while_out and all(s.server == f"{NODES[1]}_0" for s in while_out), {s.server for s in while_out}
    assert any(s.server == drained_server for s in load.samples if s.started > back + 1)


def test_a_killed_instance_costs_only_its_requests_in_flight(fleet: Fleet, testnodes: TestNodes) -> None:
    victim = f"{NODES[1]}_0"
    # More clients than both instances run at once (maxconn 8 each): some always wait in the gateway's
    # queue, to be handed to the dead instance if the gateway kept choosing it.
    load = fleet.load(clients=20, max_requests=20000, max_seconds=300).start()
    try:
        time.sleep(3)
        held_before = int(server_stat(testnodes, victim)["smax"])
        before_kill = time.monotonic()
        testnodes.ssh(NODES[1], "systemctl kill --kill-whom=main --signal=SIGKILL sdserve@0.service")
        killed = time.monotonic()
        wait_for(lambda: not server_states(fleet.inventory)[victim].startswith("UP"), 30, f"{victim} out")
        # When HAProxy itself took it out: its `lastchg`, seconds since the server's last state change.
        out = time.monotonic() - last_change_s(testnodes, victim)
        # systemd restarts it (Restart=on-failure); the gateway puts it back once /readyz answers.
        wait_for(lambda: server_states(fleet.inventory)[victim] == "UP", 180, f"{victim} back in rotation")
        back = time.monotonic()
        time.sleep(3)
    finally:
        summary = load.stop()
    failures = [s for s in load.samples if not s.ok]
    # The most sessions the gateway ever held on it at once (`smax`). HAProxy lets it pass the server's
    # maxconn (MAX_BATCH, 8) around a kill: two runs read 8 before the kill and 14 after it.
    held = int(server_stat(testnodes, victim)["smax"])
    ends = [s.ended for s in failures] or [0.0]
    record(
        "killed_instance",
        summary_figures(summary)
        | {
            "out_of_rotation_after_s": round(out - killed, 2),
            "back_after_s": round(back - killed, 1),
            "failures_died_within_s": round(max(ends) - min(ends), 3),
            "gateway_smax_before_kill": held_before,
            "gateway_smax": held,
        },
    )  # fmt: skip
    # Only what was in flight on it when it died. It died at the first failure's end: after the kill
    # command began, and no later than a second after it returned.
    assert failures, "nothing was in flight on the killed instance: the test proved nothing"
    died = min(ends)
    assert before_kill <= died <= killed + 1.0, (before_kill, died, killed)
    # Every failure was sent before it died and died with it. What the gateway sent to the dead
    # instance afterwards would fail later: with no retry-on and redispatch a run lost 708 over seconds,
    # with no observe layer4 741, as leastconn kept choosing it until its checks failed.
    assert all(s.started < died and s.ended - died <= 0.5 for s in failures), summary.failures
    # Where the gateway answered, it answered on its behalf. A request on a kept-alive client
    # connection gets no answer (HAProxy closes it so that the client may retry), hence "".
    assert {s.server for s in failures} <= {victim, ""}, summary.failures[:10]
    # And no more than the gateway had on it at most. A loose bound (the sessions that fail count in
    # it): the timing above is what catches requests sent to it after it died.
    assert len(failures) <= held, (len(failures), held)
    # Out of rotation within its check window (lastchg counts whole seconds, hence the 1 s), and back.
    assert out - before_kill <= CHECK_WINDOW_S + 1, out - before_kill
    assert any(s.server == victim and s.ok for s in load.samples if s.started > back), summary.line()


def test_a_gateway_reload_under_load_drops_nothing(fleet: Fleet) -> None:
    """A configuration change reloads HAProxy (new workers on the same sockets); nothing is refused."""
    load = fleet.load(clients=4, max_requests=20000, max_seconds=300).start()
    try:
        time.sleep(2)
        for timeout in (31, 30):  # a change, then back: two reloads
            run = ansible_playbook(
                "gateway.yml", fleet.inventory, extra_vars={"sd_gateway_queue_timeout": timeout},
                label=f"fleet-gateway-reload-{timeout}",
            )  # fmt: skip
            assert_converged(run)
            assert "RUNNING HANDLER [sd_gateway : Gateway | Reload HAProxy]" in run.output, run.explain()
        time.sleep(2)
    finally:
        summary = load.stop()
    record("gateway_reloads_under_load", summary_figures(summary))
    assert summary.failed == 0, summary.failures[:10]


def test_requests_past_the_queue_timeout_get_503_with_retry_after(fleet: Fleet) -> None:
    """One request per instance at a time and a 1 s queue: the rest wait, then get the gateway's 503."""
    tight = ansible_playbook(
        "gateway.yml",
        fleet.inventory,
        extra_vars={"sd_gateway_queue_timeout": 1, "sd_gateway_server_maxconn": 1},
        label="fleet-gateway-tight",
    )
    assert_converged(tight)
    try:
        with httpx.Client(verify=fleet.endpoints["ca_file"], timeout=60) as http:

            def one(_: int) -> httpx.Response:
                return http.post(
                    fleet.endpoints["gateway_url"] + "/sdapi/v1/txt2img",
                    headers={"Authorization": f"Bearer {fleet.key}"},
                    json={"prompt": "queue", "steps": 40, "width": 64, "height": 64},
                )

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(one, range(12)))
    finally:
        assert_converged(ansible_playbook("gateway.yml", fleet.inventory, label="fleet-gateway-back"))
    refused = [a for a in answers if a.status_code != 200]
    assert refused and len(refused) < len(answers), [a.status_code for a in answers]
    for answer in refused:
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "10", answer.text
        assert answer.json()["error"]["code"] == "overloaded"


def test_deploying_to_every_node_at_once_vs_one(fleet: Fleet) -> None:
    """A setting change that restarts every instance: one node, then both with serial unset (all)."""
    one = ansible_playbook(
        "deploy.yml",
        fleet.inventory,
        extra_vars={"sd_service_settings": {"BATCH_WAIT_MS": 6}},
        limit=NODES[0],
        label="fleet-deploy-one",
    )
    assert_converged(one)
    every = ansible_playbook(
        "deploy.yml",
        fleet.inventory,
        extra_vars={"sd_service_settings": {"BATCH_WAIT_MS": 5}, "sdnode_serial": "100%"},
        label="fleet-deploy-all",
    )
    assert_converged(every)
    assert all(every.recap[n]["changed"] > 0 for n in NODES), every.explain()
    record(
        "deploy_all_vs_one",
        {"one_node_s": round(one.seconds, 1), "all_nodes_s": round(every.seconds, 1),
         "ratio": round(every.seconds / one.seconds, 2)},
    )  # fmt: skip


def test_every_host_and_the_monitoring_verify(fleet: Fleet) -> None:
    """The testinfra suites (`make verify`): every serving node's, then the monitoring's (all targets up)."""
    inv = str(fleet.inventory)
    out = assert_pytest_passes(["make", "verify", f"INVENTORY={inv}"])
    # make verify runs the monitoring's checks on the sdmonitor hosts too, none of them skipped there.
    assert "test_every_target_is_up[ansible://fleetgw] PASSED" in out, out[-3000:]
    assert "test_monitor.py" in out and "test_monitor.py::" in out


def test_demo_fleet_clean_removes_the_fleet(fleet: Fleet, testnodes: TestNodes) -> None:
    if os.environ.get("SDNODE_KEEP_NODES") == "1":
        pytest.skip("SDNODE_KEEP_NODES=1 keeps the fleet")
    proc = subprocess.run(["make", "--no-print-directory", "demo-fleet-clean"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = subprocess.run([str(REPO / ".venv/bin/testnode"), "list"], capture_output=True, text=True).stdout
    assert not {line.split()[0] for line in listed.splitlines()[1:] if line.strip()} & {*NODES, GATEWAY}
    assert not (STATE / "demo-fleet" / "endpoints.json").exists()


def summary_figures(summary: Summary) -> dict:
    return {
        "sent": summary.sent,
        "failed": summary.failed,
        "p50_s": round(summary.p50_s, 3),
        "p95_s": round(summary.p95_s, 3),
        "seconds": round(summary.seconds, 1),
        "by_instance": summary.by_server,
    }
