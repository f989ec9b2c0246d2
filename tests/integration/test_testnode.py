"""testnode for real: nodes boot, talk, reboot, reach the registries, and leave nothing behind.

Needs root, systemd-nspawn and the network; every node is named after this process so that runs of
other people on the same machine are left alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest
from sdnode.state import cache_dir
from sdnode.testnode import images, names, network, noderoot, processes, records, rootfs, supervisor

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TESTNODE = str(VENV_BIN / "testnode")
RUN_ID = f"{os.getpid() % 100000}"


def node_name(letter: str) -> str:
    return f"tn{RUN_ID}{letter}"


def run_testnode(
    state: Path, *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [TESTNODE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SDNODE_STATE_DIR": str(state)},
    )
    if check and proc.returncode != 0:
        pytest.fail(f"testnode {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def on_node(state: Path, name: str, command: str, check: bool = True, timeout: float = 600) -> str:
    proc = run_testnode(state, "ssh", name, command, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"on {name}: {command!r} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout.strip()


def up_together(state: Path, *specs: list[str]) -> dict[str, str]:
    """Start several `testnode up` at once (that is the race under test); name -> printed address."""
    env = {**os.environ, "SDNODE_STATE_DIR": str(state)}
    procs = [
        subprocess.Popen(
            [TESTNODE, "up", *spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for spec in specs
    ]
    addresses = {}
    for spec, proc in zip(specs, procs, strict=True):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"testnode up {spec} failed:\n{out}\n{err}"
        addresses[spec[0]] = out.strip().splitlines()[-1]
    return addresses


def ansible(pattern: str, inventory: Path, module: str, *args: str) -> str:
    """An ad-hoc Ansible run from the repo root (its ansible.cfg), as a user would; stdout."""
    proc = subprocess.run(
        [str(VENV_BIN / "ansible"), pattern, "-i", str(inventory), "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def live_nodes_except(excepted: set[str]) -> list[str]:
    return [r.name for r in records.load_records() if r.is_live() and r.name not in excepted]


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("testnode's integration tests boot systemd-nspawn nodes and must run as root")
    run_testnode(Path("/nonexistent"), "host-setup")
    return tmp_path_factory.mktemp("testnode-state")


@pytest.fixture(scope="module")
def ip_forward_before() -> str:
    """The host's ip_forward before any node existed (None when nodes of others were already up)."""
    saved = network.ip_forward_saved()
    if saved.exists():
        return saved.read_text().strip()
    return network.ip_forward_path().read_text().strip()


def check_shared_network_after_last(ip_forward_before: str, ours: set[str]) -> None:
    """With no node left, bridge, table and ip_forward are back; with others' nodes, all stays for them."""
    if live_nodes_except(ours):
        assert network.BRIDGE in host_links()
        assert network.nft_table_exists()
        assert network.ip_forward_path().read_text().strip() == "1"
    else:
        assert network.BRIDGE not in host_links()
        assert not network.nft_table_exists()
        assert not network.ip_forward_saved().exists()
        assert network.ip_forward_path().read_text().strip() == ip_forward_before


@dataclass
class Pair:
    state: Path
    a: str  # key only
    b: str  # --password-login --memory 1G
    addresses: dict[str, str]


@pytest.fixture(scope="class")
def pair(state: Path, ip_forward_before: str) -> Iterator[Pair]:
    a, b = node_name("a"), node_name("b")
    try:
        addresses = up_together(state, [a], [b, "--password-login", "--memory", "1G"])
        yield Pair(state, a, b, addresses)
    finally:
        for name in (a, b):
            run_testnode(state, "down", name, check=False)


class TestTwoNodes:
    def test_addresses_are_distinct_and_in_the_subnet(self, pair: Pair) -> None:
        addrs = [ipaddress.IPv4Address(pair.addresses[n]) for n in (pair.a, pair.b)]
        assert addrs[0] != addrs[1]
        for addr in addrs:
            assert addr in names.NETWORK
            assert int(addr) - int(names.NETWORK.network_address) >= names.FIRST_NODE_HOST
            assert records.load_record(pair.a if addr == addrs[0] else pair.b).address == str(addr)

    def test_macs_are_fixed_so_reused_addresses_are_reachable_at_once(self, pair: Pair) -> None:
        bridge = subprocess.run(
            ["ip", "-j", "link", "show", "dev", network.BRIDGE], capture_output=True, text=True, check=True
        )
        assert json.loads(bridge.stdout)[0]["address"] == names.mac_address(str(names.GATEWAY))
        for name in (pair.a, pair.b):
            mac = on_node(pair.state, name, "cat /sys/class/net/eth0/address")
            assert mac == names.mac_address(pair.addresses[name])

    @pytest.mark.parametrize("which", ["a", "b"])
    def test_ssh_reaches_the_node_by_name(self, pair: Pair, which: str) -> None:
        name = getattr(pair, which)
        assert on_node(pair.state, name, "hostname") == name
        # degraded exits 1: the state is what counts here
        state = on_node(pair.state, name, "systemctl is-system-running", check=False)
        assert state in ("running", "degraded"), state
        assert on_node(pair.state, name, "cat /proc/1/comm") == "systemd"

    def test_each_node_has_its_own_identity(self, pair: Pair) -> None:
        ids = {on_node(pair.state, n, "cat /etc/machine-id") for n in (pair.a, pair.b)}
        keys = {
            n: on_node(pair.state, n, "cat /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
            for n in (pair.a, pair.b)
        }
        assert len(ids) == 2 and len(set(keys.values())) == 2
        known = (pair.state / "testnodes" / "known_hosts").read_text().splitlines()
        for name, key in keys.items():
            assert f"{pair.addresses[name]} ssh-ed25519 {key}" in known

    def test_nodes_reach_each_other(self, pair: Pair) -> None:
        for src, dst in ((pair.a, pair.b), (pair.b, pair.a)):
            addr = pair.addresses[dst]
            on_node(pair.state, src, f"ping -c 1 -W 5 {addr}")
            banner = on_node(
                pair.state,
                src,
                "python3 -c 'import socket; "
                f's = socket.create_connection(("{addr}", 22), 5); print(s.recv(64).decode())\'',
            )
            assert banner.startswith("SSH-2.0-OpenSSH")

    def test_node_trusts_the_controllers_ca_for_outbound_tls(self, pair: Pair) -> None:
        for cert in rootfs.HOST_CA_DIR.rglob("*.crt"):
            rel = cert.relative_to(rootfs.HOST_CA_DIR)
            on_node(pair.state, pair.a, f"test -s /usr/local/share/ca-certificates/{rel}")
        status = on_node(
            pair.state,
            pair.a,
            "python3 -c 'import urllib.request as u; "
            'print(u.urlopen("https://pypi.org/simple/pip/", timeout=60).status)\'',
        )
        assert status == "200"

    def test_apt_and_pip_work_inside(self, pair: Pair) -> None:
        on_node(
            pair.state,
            pair.a,
            "DEBIAN_FRONTEND=noninteractive apt-get update -q && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip",
        )
        out = on_node(
            pair.state, pair.a, "rm -rf /root/dl && python3 -m pip download --no-deps -d /root/dl six"
        )
        assert "Successfully downloaded six" in out
        assert on_node(pair.state, pair.a, "ls /root/dl").startswith("six-")

    def test_the_nodes_firewall_is_its_own(self, pair: Pair) -> None:
        on_node(
            pair.state,
            pair.b,
            "DEBIAN_FRONTEND=noninteractive apt-get update -q && "
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nftables",
        )
        on_node(pair.state, pair.b, "nft add table inet sdn_probe")
        try:
            assert "table inet sdn_probe" in on_node(pair.state, pair.b, "nft list ruleset")
            host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
            assert "sdn_probe" not in host.stdout
        finally:
            on_node(pair.state, pair.b, "nft delete table inet sdn_probe", check=False)

    def test_net_sysctls_are_the_nodes_and_the_hosts_kernel_is_not(self, pair: Pair) -> None:
        host_file = Path("/proc/sys/net/ipv4/conf/all/rp_filter")
        host_value = host_file.read_text().strip()
        wanted = "1" if host_value == "2" else "2"
        on_node(pair.state, pair.a, f"sysctl -w net.ipv4.conf.all.rp_filter={wanted}")
        assert on_node(pair.state, pair.a, "sysctl -n net.ipv4.conf.all.rp_filter") == wanted
        assert host_file.read_text().strip() == host_value  # the node's own namespace, not the host's
        refused = run_testnode(pair.state, "ssh", pair.a, "sysctl -w kernel.kptr_restrict=2", check=False)
        assert refused.returncode != 0

    def test_systemd_analyze_security_runs(self, pair: Pair) -> None:
        assert "Overall exposure level for ssh.service" in on_node(
            pair.state, pair.a, "systemd-analyze security ssh.service"
        )

    def test_password_login_only_where_asked(self, pair: Pair) -> None:
        pw_file = pair.state / "testnodes" / f"{pair.b}.password"
        assert pw_file.stat().st_mode & 0o777 == 0o600
        password = pw_file.read_text().strip()
        assert not (pair.state / "testnodes" / f"{pair.a}.password").exists()
        known_hosts = str(pair.state / "testnodes" / "known_hosts")

        def password_login(name: str) -> str:
            client = paramiko.SSHClient()
            client.load_host_keys(known_hosts)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                client.connect(
                    pair.addresses[name],
                    username="root",
                    password=password,
                    look_for_keys=False,
                    allow_agent=False,
                    timeout=10,
                )
                _, out, _ = client.exec_command("id -u")
                return out.read().decode().strip()
            finally:
                client.close()

        assert password_login(pair.b) == "0"
        with pytest.raises(paramiko.AuthenticationException):
            password_login(pair.a)
        assert "passwordauthentication no" in on_node(pair.state, pair.a, "sshd -T").splitlines()
        assert "passwordauthentication yes" in on_node(pair.state, pair.b, "sshd -T").splitlines()

    def test_memory_limit_applies(self, pair: Pair) -> None:
        record = records.load_record(pair.b)
        assert record is not None and record.cgroup
        limit_file = Path(record.cgroup) / "memory.limit_in_bytes"
        if not limit_file.exists():
            limit_file = Path(record.cgroup) / "memory.max"
        assert int(limit_file.read_text()) == 2**30
        procs = {int(p) for p in (Path(record.cgroup) / "cgroup.procs").read_text().split()}
        assert record.supervisor_pid in procs

    def test_up_again_just_reports_the_node(self, pair: Pair) -> None:
        before = records.load_record(pair.a)
        again = run_testnode(pair.state, "up", pair.a)
        assert again.stdout.strip() == pair.addresses[pair.a]
        assert "already up" in again.stderr
        after = records.load_record(pair.a)
        assert before is not None and after is not None
        assert after.supervisor_pid == before.supervisor_pid

    def test_another_checkout_cannot_take_the_name(self, pair: Pair, tmp_path: Path) -> None:
        before = records.load_record(pair.a)
        refused = run_testnode(tmp_path / "other-checkout", "up", pair.a, check=False)
        assert refused.returncode == 1
        assert f"belongs to {pair.state}" in refused.stderr
        after = records.load_record(pair.a)
        assert before is not None and after is not None and after.is_running()
        assert after.supervisor_pid == before.supervisor_pid
        assert on_node(pair.state, pair.a, "hostname") == pair.a

    def test_list_shows_both_running(self, pair: Pair) -> None:
        listed = {n["name"]: n for n in json.loads(run_testnode(pair.state, "list", "--json").stdout)}
        for name in (pair.a, pair.b):
            assert listed[name]["status"] == "running" and listed[name]["mine"]
            assert listed[name]["address"] == pair.addresses[name]
        assert listed[pair.b]["password_login"] and not listed[pair.a]["password_login"]

    def test_inventory_drives_ansible_with_group_vars(self, pair: Pair, tmp_path: Path) -> None:
        group_vars = tmp_path / "group_vars"
        (group_vars / "sdnodes").mkdir(parents=True)
        (group_vars / "sdnodes" / "probe.yml").write_text("testnode_probe: from-group-vars\n")
        path = Path(run_testnode(pair.state, "inventory", "--group-vars", str(group_vars)).stdout.strip())
        assert path == pair.state / "testnodes" / "inventory" / "hosts.yml"
        out = ansible("sdnodes", path, "ansible.builtin.debug", "-a", "var=testnode_probe")
        assert out.count('"testnode_probe": "from-group-vars"') == 2
        ping = ansible("sdnodes", path, "ansible.builtin.ping", "-o")
        answered = {line.split(" | ")[0] for line in ping.splitlines() if " | SUCCESS" in line}
        assert answered == {pair.a, pair.b}

    def test_inventory_drives_testinfra(self, pair: Pair, tmp_path: Path) -> None:
        path = Path(run_testnode(pair.state, "inventory").stdout.strip())
        (tmp_path / "test_probe.py").write_text(
            "def test_probe(host):\n"
            "    assert host.check_output('hostname') == host.backend.get_hostname()\n"
            "    assert host.system_info.distribution == 'debian'\n"
        )
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-c",
                "/dev/null",
                "--rootdir",
                str(tmp_path),
                f"--ansible-inventory={path}",
                "--hosts=ansible://sdnodes",
                str(tmp_path / "test_probe.py"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
            env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 passed" in proc.stdout

    def test_reboot_comes_back_with_a_new_boot_id(self, pair: Pair) -> None:
        before = on_node(pair.state, pair.a, "cat /proc/sys/kernel/random/boot_id")
        path = Path(run_testnode(pair.state, "inventory").stdout.strip())
        assert '"rebooted": true' in ansible(pair.a, path, "ansible.builtin.reboot")
        after = on_node(pair.state, pair.a, "cat /proc/sys/kernel/random/boot_id")
        assert after != before
        state = on_node(pair.state, pair.a, "systemctl is-system-running --wait", check=False)
        assert state in ("running", "degraded"), state
        record = records.load_record(pair.a)
        assert record is not None and record.is_running()  # same supervisor, nspawn started again


def test_down_removes_everything(state: Path, ip_forward_before: str) -> None:
    name = node_name("c")
    address = up_together(state, [name, "--password-login"])[name]
    record = records.load_record(name)
    assert record is not None
    assert names.netns_name(name) in network.netns_list() and names.veth_name(address) in host_links()

    run_testnode(state, "down", name)

    assert records.load_record(name) is None
    assert not records.node_dir(name).exists()
    assert names.netns_name(name) not in network.netns_list()
    assert names.veth_name(address) not in host_links()
    assert supervisor.stray_pids({name}) == []
    assert not (supervisor.NSPAWN_PROPAGATE / name).exists()
    assert noderoot.node_mounts(name) == []
    assert not processes.proc_alive(record.supervisor_pid, record.supervisor_start)
    assert f"{address} " not in (state / "testnodes" / "known_hosts").read_text()
    assert not (state / "testnodes" / f"{name}.password").exists()
    assert name not in (state / "testnodes" / "inventory" / "hosts.yml").read_text()
    check_shared_network_after_last(ip_forward_before, {name})
    # The root filesystem is deleted in the background: gone, or being deleted.
    left = set(noderoot.trash_dir().glob(f"{name}-*"))
    assert left <= noderoot.trash_being_deleted()
    again = run_testnode(state, "down", name)
    assert "no such node" in again.stderr + again.stdout


def supervisor_children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_gc_cleans_a_killed_run_and_spares_live_nodes(state: Path, ip_forward_before: str) -> None:
    killed, survivor, half = node_name("d"), node_name("e"), node_name("f")
    addresses = up_together(state, [killed], [survivor])
    try:
        record = records.load_record(killed)
        assert record is not None and record.supervisor_pid
        # A killed run: supervisor and nspawn die at once; the node's systemd lives on without them.
        nspawn = supervisor_children(record.supervisor_pid)
        for pid in [record.supervisor_pid, *nspawn]:
            os.kill(pid, signal.SIGKILL)
        assert processes.wait_gone([record.supervisor_pid], 10)
        inside = processes.pids_rooted_at([noderoot.rootfs_path(killed)])
        assert inside, "expected the node's processes to outlive a killed systemd-nspawn"
        # ... and an `up` killed half-way: a namespace and a root filesystem, no record.
        subprocess.run(["ip", "netns", "add", names.netns_name(half)], check=True)
        (noderoot.rootfs_path(half) / "etc").mkdir(parents=True)
        # ... and a root filesystem build killed inside debootstrap, with /proc still mounted in it.
        build = cache_dir() / f"{rootfs.BUILD_PREFIX}{RUN_ID}"
        (build / "root" / "proc").mkdir(parents=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(build / "root" / "proc")], check=True)

        statuses = {n["name"]: n["status"] for n in json.loads(run_testnode(state, "list", "--json").stdout)}
        assert statuses[killed] == "dead" and statuses[survivor] == "running"

        out = run_testnode(state, "gc").stdout
        assert killed in out

        assert processes.wait_gone(inside, 5)
        assert processes.pids_rooted_at([noderoot.rootfs_path(killed)]) == []
        for name in (killed, half):
            assert records.load_record(name) is None
            assert not records.node_dir(name).exists()
            assert names.netns_name(name) not in network.netns_list()
        assert names.veth_name(addresses[killed]) not in host_links()
        assert supervisor.stray_pids({killed}) == []
        assert not (supervisor.NSPAWN_PROPAGATE / killed).exists()
        assert noderoot.node_mounts(killed) == []
        assert not build.exists()
        assert str(build) not in Path("/proc/self/mounts").read_text()
        # The live node is untouched and still reachable.
        assert on_node(state, survivor, "hostname") == survivor
        assert names.veth_name(addresses[survivor]) in host_links()
        assert network.BRIDGE in host_links() and network.nft_table_exists()
    finally:
        run_testnode(state, "down", survivor, check=False)
        run_testnode(state, "down", killed, check=False)
        subprocess.run(["ip", "netns", "delete", names.netns_name(half)], capture_output=True)
        build = cache_dir() / f"{rootfs.BUILD_PREFIX}{RUN_ID}"
        subprocess.run(["umount", "-l", str(build / "root" / "proc")], capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(build)], check=True)
    check_shared_network_after_last(ip_forward_before, {killed, survivor, half})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_up_leaves_nothing(state: Path, sig: signal.Signals) -> None:
    name = node_name("g")
    proc = subprocess.Popen(
        [TESTNODE, "up", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SDNODE_STATE_DIR": str(state)},
        # A suite started as a background job of a script inherits SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: give the child the default, as a terminal's Ctrl-C finds it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Interrupt as soon as the node is claimed (boot takes seconds after that).
        for _ in range(600):
            record = records.load_record(name)
            if record is not None or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert record is not None and record.status == "creating", proc.communicate()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, err
        assert "Traceback" not in err
        assert records.load_record(name) is None
        assert not records.node_dir(name).exists()
        assert names.netns_name(name) not in network.netns_list()
        assert names.veth_name(record.address) not in host_links()
        assert supervisor.stray_pids({name}) == []
    finally:
        proc.kill()
        proc.wait()
        run_testnode(state, "down", name, check=False)


def test_cached_root_filesystem_carries_no_identity(state: Path) -> None:
    tarball = rootfs.rootfs_tarball(images.OS_IMAGES[images.DEFAULT_OS])
    if not tarball.exists():
        run_testnode(state, "up", node_name("h"))
        run_testnode(state, "down", node_name("h"))
    members = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, text=True, check=True).stdout
    entries = {m.removeprefix("./") for m in members.splitlines()}
    assert not [n for n in entries if n.startswith("etc/ssh/ssh_host_")]
    assert "usr/sbin/sshd" in entries and "usr/lib/systemd/systemd" in entries
    for cert in rootfs.HOST_CA_DIR.rglob("*.crt"):
        assert f"usr/local/share/ca-certificates/{cert.relative_to(rootfs.HOST_CA_DIR)}" in entries
    machine_id = subprocess.run(
        ["tar", "-xOf", str(tarball), "./etc/machine-id"], capture_output=True, check=True
    ).stdout
    assert machine_id == b""
    # Nodes write to their own upper layer, never to the shared tree under them.
    tree = rootfs.base_tree(tarball)
    assert (tree / "etc/machine-id").read_text() == ""
    assert not list((tree / "etc/ssh").glob("ssh_host_*"))
    assert not (tree / "root/.ssh/authorized_keys").exists()


def test_gc_removes_nodes_whose_checkout_is_gone(tmp_path: Path, ip_forward_before: str) -> None:
    """A fresh clone (CI) starts with `testnode gc`: nodes of a deleted checkout can never be reached
    again (their key went with it), so they go even though they still run."""
    gone_state = tmp_path / "deleted-checkout"
    name = node_name("o")
    address = up_together(gone_state, [name])[name]
    try:
        record = records.load_record(name)
        assert record is not None and record.is_running()
        subprocess.run(["rm", "-rf", str(gone_state)], check=True)
        out = run_testnode(tmp_path / "fresh-clone", "gc").stdout
        assert f"orphaned node {name}" in out
        assert records.load_record(name) is None
        assert not processes.proc_alive(record.supervisor_pid, record.supervisor_start)
        assert names.netns_name(name) not in network.netns_list()
        assert names.veth_name(address) not in host_links()
    finally:
        run_testnode(tmp_path, "down", name, check=False)
    check_shared_network_after_last(ip_forward_before, {name})
