"""testnode's pure logic: names, addresses, records, known_hosts, inventory, the nft ruleset, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from sdnode.testnode import (
    checkout,
    cli,
    fileops,
    images,
    inventory,
    lifecycle,
    names,
    network,
    noderoot,
    processes,
    records,
    rootfs,
    supervisor,
)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def nodes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Node records in a temp dir instead of /var/lib/sdnode/testnodes."""
    path = tmp_path / "nodes"
    monkeypatch.setenv(records.NODES_ENV, str(path))
    return path


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("SDNODE_STATE_DIR", str(path))
    return path


def running_record(name: str, address: str, state: Path, **kw: object) -> records.NodeRecord:
    """A record whose 'supervisor' is this test process, so it counts as running."""
    return records.NodeRecord(
        name=name,
        address=address,
        state_dir=str(state),
        status="up",
        supervisor_pid=os.getpid(),
        supervisor_start=processes.proc_start_time(os.getpid()),
        **kw,
    )


# --- names and addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "demo", "sn1", "node-2", "a" * 32])
def test_valid_names_pass(name: str) -> None:
    assert names.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "a_b", "a--b", "a-", "-a", "a" * 33, "../x", "a b"])
def test_invalid_names_are_refused_with_the_name(name: str) -> None:
    with pytest.raises(processes.TestnodeError, match="node name"):
        names.validate_name(name)


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        ([], "10.213.0.10"),
        (["10.213.0.10", "10.213.0.11"], "10.213.0.12"),
        (["10.213.0.10", "10.213.0.12"], "10.213.0.11"),
        (["10.213.0.11"], "10.213.0.10"),
    ],
)
def test_allocation_takes_the_lowest_free_address(used: list[str], expected: str) -> None:
    assert names.allocate_address(used) == expected


def test_allocation_fails_clearly_when_the_subnet_is_full() -> None:
    used = [f"10.213.0.{i}" for i in range(10, 255)]
    with pytest.raises(processes.TestnodeError, match="no free address"):
        names.allocate_address(used)


def test_veth_names_fit_the_kernel_limit_and_are_unique() -> None:
    veths = [names.veth_name(f"10.213.0.{i}") for i in range(10, 255)]
    assert max(len(n) for n in veths) <= 15
    assert len(set(veths)) == len(veths)


def test_mac_addresses_are_fixed_per_address_unique_and_local() -> None:
    macs = [names.mac_address(f"10.213.0.{i}") for i in range(10, 255)]
    assert len(set(macs)) == len(macs)
    assert names.mac_address("10.213.0.17") == names.mac_address("10.213.0.17") == "02:53:44:4e:00:11"
    first = int(macs[0].split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1073741824", 2**30),
        ("4g", 4 * 2**30),
    ],
)
def test_memory_sizes_parse(text: str, expected: int) -> None:
    assert cli.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "2X", "", "64M"])
def test_bad_memory_sizes_name_the_option(text: str) -> None:
    with pytest.raises(processes.TestnodeError, match="--memory"):
        cli.parse_memory(text)


# --- processes and records ---------------------------------------------------------------------------


def test_proc_alive_guards_against_pid_reuse() -> None:
    me, start = os.getpid(), processes.proc_start_time(os.getpid())
    assert processes.proc_alive(me, start)
    assert not processes.proc_alive(me, (start or 0) + 1)
    assert not processes.proc_alive(None, None)
    child = subprocess.Popen(["true"])
    child.wait()
    assert not processes.proc_alive(child.pid, None)


def test_record_liveness(nodes_dir: Path, state: Path) -> None:
    me, start = os.getpid(), processes.proc_start_time(os.getpid())
    creating = records.NodeRecord(
        name="a", address="10.213.0.10", state_dir=str(state), owner_pid=me, owner_start=start
    )
    assert creating.is_live() and not creating.is_running()
    assert records.node_status(creating) == "creating"
    orphan = records.NodeRecord(
        name="b", address="10.213.0.11", state_dir=str(state), owner_pid=me, owner_start=(start or 0) + 1
    )
    assert not orphan.is_live()
    dead = records.NodeRecord(
        name="c",
        address="10.213.0.12",
        state_dir=str(state),
        status="up",
        supervisor_pid=me,
        supervisor_start=(start or 0) + 1,
    )
    assert records.node_status(dead) == "dead"
    assert records.node_status(running_record("d", "10.213.0.13", state)) == "running"


def test_records_round_trip_and_ignore_unknown_keys(nodes_dir: Path, state: Path) -> None:
    record = running_record("rt", "10.213.0.10", state, password_login=True, memory=2**30)
    records.save_record(record)
    assert records.load_record("rt") == record
    data = json.loads(records.record_path("rt").read_text())
    data["from_a_newer_version"] = 1
    records.record_path("rt").write_text(json.dumps(data))
    assert records.load_record("rt") == record
    assert [r.name for r in records.load_records()] == ["rt"]
    assert records.load_record("missing") is None


def test_unreadable_record_points_at_gc(nodes_dir: Path) -> None:
    records.record_path("bad").parent.mkdir(parents=True)
    records.record_path("bad").write_text("{not json")
    with pytest.raises(processes.TestnodeError, match="testnode gc"):
        records.load_record("bad")


def sleeper(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args], env=env)


def wait_for(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_supervisors_are_found_by_their_marker_only() -> None:
    marked = sleeper(env={**os.environ, supervisor.SUPERVISOR_ENV: "fakenode"})
    # What an old supervisor's command line looked like, without the marker: not a supervisor.
    lookalike = sleeper("sdnode.testnode", "_supervise", "othernode", "0")
    try:
        wait_for(lambda: "othernode" in processes.proc_cmdline(lookalike.pid))
        wait_for(lambda: supervisor.SUPERVISOR_ENV in processes.proc_environ(marked.pid))
        assert marked.pid in supervisor.stray_pids({"fakenode"})
        assert marked.pid not in supervisor.stray_pids({"othernode"})
        assert supervisor.node_of_pid(marked.pid) == "fakenode"
        assert supervisor.node_of_pid(lookalike.pid) is None
        assert lookalike.pid not in supervisor.node_processes()
    finally:
        for proc in (marked, lookalike):
            proc.kill()
            proc.wait()


def test_a_started_supervisor_carries_the_marker_and_nspawn_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real start-up command (python -m ... _supervise), with `sleep` standing in for systemd-nspawn.
    monkeypatch.setattr(supervisor, "nspawn_argv", lambda _name: ["sleep", "60"])
    checkout.testnodes_state(tmp_path).mkdir(parents=True)
    record = records.NodeRecord(name="fakenode", address="10.213.0.10", state_dir=str(tmp_path))
    supervisor.start_supervisor(record, tmp_path)
    pid = record.supervisor_pid
    assert pid is not None
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        wait_for(lambda: children.read_text().split())
        (child,) = [int(c) for c in children.read_text().split()]
        assert supervisor.node_of_pid(pid) == "fakenode"
        assert processes.proc_cmdline(child) == ["sleep", "60"]
        assert supervisor.node_of_pid(child) is None
        assert "supervisor: starting sleep 60" in checkout.log_tail(tmp_path, "fakenode")
    finally:
        os.killpg(pid, signal.SIGKILL)
        assert processes.wait_gone([pid], 10)


def test_processes_are_found_by_root_directory(tmp_path: Path) -> None:
    assert os.getpid() in processes.pids_rooted_at([Path("/")])
    assert os.getpid() not in processes.pids_rooted_at([tmp_path])
    assert processes.pids_rooted_at([tmp_path / "absent"]) == []


# --- per-checkout files ------------------------------------------------------------------------------


def test_known_hosts_replaces_only_the_nodes_address(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("10.213.0.10 ssh-ed25519 OLD\n10.213.0.11 ssh-ed25519 KEEP\n10.213.0.100 ssh-rsa KEEP2\n")
    checkout.update_known_hosts(path, "10.213.0.10", ["ssh-ed25519 NEW", "ssh-rsa NEW2"])
    assert path.read_text().splitlines() == [
        "10.213.0.11 ssh-ed25519 KEEP",
        "10.213.0.100 ssh-rsa KEEP2",
        "10.213.0.10 ssh-ed25519 NEW",
        "10.213.0.10 ssh-rsa NEW2",
    ]
    checkout.update_known_hosts(path, "10.213.0.10", [])
    assert "10.213.0.10 " not in path.read_text()


def test_write_file_is_atomic_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "secret"
    fileops.write_file(target, "pw\n", 0o600)
    assert target.read_text() == "pw\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret"]  # no temp file left behind


def ansible_inventory_list(path: Path) -> dict:
    tool = shutil.which("ansible-inventory", path=str(VENV_BIN)) or shutil.which("ansible-inventory")
    if tool is None:
        pytest.skip("ansible-inventory is not installed")
    out = subprocess.run(
        [tool, "-i", str(path), "--list"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"},
    )
    return json.loads(out.stdout)


def test_inventory_lists_only_this_checkouts_running_nodes(
    nodes_dir: Path, state: Path, tmp_path: Path
) -> None:
    records.save_record(running_record("mine", "10.213.0.10", state))
    records.save_record(running_record("theirs", "10.213.0.11", tmp_path / "other-checkout"))
    records.save_record(records.NodeRecord(name="booting", address="10.213.0.12", state_dir=str(state)))
    path = inventory.write_inventory(state)
    assert path == state / "testnodes" / "inventory" / "hosts.yml"
    listed = ansible_inventory_list(path)
    assert listed["sdnodes"]["hosts"] == ["mine"]
    hostvars = listed["_meta"]["hostvars"]["mine"]
    assert hostvars["ansible_host"] == "10.213.0.10"
    assert hostvars["ansible_user"] == "root"
    assert hostvars["ansible_ssh_private_key_file"] == str(state / "testnodes" / "id_ed25519")
    assert hostvars["sdnode_accelerator"] == "cpu"
    args = hostvars["ansible_ssh_common_args"]
    assert f"UserKnownHostsFile={state / 'testnodes' / 'known_hosts'}" in args
    assert "StrictHostKeyChecking=yes" in args


def test_empty_inventory_is_valid(nodes_dir: Path, state: Path) -> None:
    listed = ansible_inventory_list(inventory.write_inventory(state))
    assert "mine" not in listed["_meta"]["hostvars"]
    assert yaml.safe_load(checkout.default_inventory_path(state).read_text())["all"]["children"]["sdnodes"]


def test_group_vars_link_applies_test_variables(nodes_dir: Path, state: Path, tmp_path: Path) -> None:
    records.save_record(running_record("gv", "10.213.0.10", state))
    group_vars = tmp_path / "gv"
    (group_vars / "sdnodes").mkdir(parents=True)
    (group_vars / "sdnodes" / "test.yml").write_text("nvidia_driver_hardware_checks: false\n")
    out = tmp_path / "elsewhere" / "hosts.yml"
    assert inventory.write_inventory(state, out, group_vars) == out
    assert (out.parent / "group_vars").resolve() == group_vars
    hostvars = ansible_inventory_list(out)["_meta"]["hostvars"]["gv"]
    assert hostvars["nvidia_driver_hardware_checks"] is False
    # Rewriting with another directory moves the link.
    other = tmp_path / "gv2"
    other.mkdir()
    inventory.write_inventory(state, out, other)
    assert (out.parent / "group_vars").resolve() == other


def test_group_vars_never_replaces_a_real_directory(nodes_dir: Path, state: Path, tmp_path: Path) -> None:
    out = tmp_path / "inv" / "hosts.yml"
    (out.parent / "group_vars").mkdir(parents=True)
    with pytest.raises(processes.TestnodeError, match="not a symlink"):
        inventory.write_inventory(state, out, tmp_path)
    with pytest.raises(processes.TestnodeError, match="--group-vars"):
        inventory.write_inventory(state, tmp_path / "x" / "hosts.yml", tmp_path / "absent")


# --- root filesystem recipe and node files -----------------------------------------------------------


def test_recipe_hash_is_stable_and_tracks_every_input() -> None:
    debian = images.OS_IMAGES["debian-12"]
    recipe = rootfs.rootfs_recipe(debian)
    assert rootfs.recipe_hash(recipe) == rootfs.recipe_hash(json.loads(json.dumps(recipe)))
    for key, value in [
        ("include", [*recipe["include"], "vim"]),
        ("ca", {"x.crt": "PEM"}),
        ("steps", recipe["steps"] + 1),
        ("mirror", "http://example.org/debian"),
        ("components", ["main", "contrib"]),
        ("keyring", "0" * 64),
    ]:
        assert rootfs.recipe_hash({**recipe, key: value}) != rootfs.recipe_hash(recipe), key
    assert rootfs.rootfs_tarball(debian, recipe).name == f"rootfs-bookworm-{rootfs.recipe_hash(recipe)}.tar"


def test_recipe_holds_what_ansible_needs() -> None:
    include = set(rootfs.rootfs_recipe(images.OS_IMAGES["debian-12"])["include"])
    assert {
        "systemd",
        "systemd-sysv",
        "dbus",
        "openssh-server",
        "python3",
        "sudo",
        "iproute2",
        "ca-certificates",
    } <= include
    assert "python3-apt" not in include  # Ansible's apt module installs it, as on a fresh cloud image


def test_host_apt_settings_mirror_only_proxy_and_validity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "01proxy").write_text('Acquire::http::Proxy "http://proxy:3128";\n')
    (tmp_path / "99valid").write_text('Acquire::Check-Valid-Until "false";\n')
    (tmp_path / "20unrelated").write_text('APT::Install-Recommends "false";\n')
    monkeypatch.setattr(rootfs, "HOST_APT_CONF_DIR", tmp_path)
    assert sorted(rootfs.host_apt_settings()) == ["01proxy", "99valid"]


def test_sources_cover_updates_and_security() -> None:
    lines = images.OS_IMAGES["debian-12"].sources_list().splitlines()
    assert "deb http://deb.debian.org/debian bookworm main" in lines
    assert "deb http://deb.debian.org/debian bookworm-updates main" in lines
    assert "deb http://deb.debian.org/debian-security bookworm-security main" in lines
    # Ubuntu's components as on its cloud images: Canonical's NVIDIA driver is in restricted.
    lines = images.OS_IMAGES["ubuntu-22.04"].sources_list().splitlines()
    assert "deb http://archive.ubuntu.com/ubuntu jammy-updates main restricted universe multiverse" in lines
    assert "deb http://security.ubuntu.com/ubuntu jammy-security main restricted universe multiverse" in lines


def test_each_release_has_its_own_cached_root_filesystem() -> None:
    tarballs = {rootfs.rootfs_tarball(image).name for image in images.OS_IMAGES.values()}
    assert len(tarballs) == len(images.OS_IMAGES)
    assert {t.split("-")[1] for t in tarballs} == {"bookworm", "jammy", "noble"}


def test_up_refuses_an_unknown_release_before_touching_the_host() -> None:
    with pytest.raises(processes.TestnodeError, match=r"debian-12, ubuntu-22\.04, ubuntu-24\.04"):
        lifecycle.up("n1", os_name="centos-9")


def test_sshd_dropin_modes() -> None:
    key_only = noderoot.sshd_dropin(False)
    assert "PasswordAuthentication no" in key_only and "PermitRootLogin yes" not in key_only
    password = noderoot.sshd_dropin(True)
    assert "PasswordAuthentication yes" in password and "PermitRootLogin yes" in password


def test_hosts_file_names_the_node() -> None:
    text = noderoot.hosts_file("demo", "10.213.0.10")
    assert "10.213.0.10\tdemo" in text and "127.0.0.1\tlocalhost" in text


def test_node_resolvers_are_reachable_from_a_namespace() -> None:
    import ipaddress
    import re

    servers = re.findall(r"^\s*nameserver\s+(\S+)", noderoot.resolv_conf(), re.MULTILINE)
    assert servers and not all(ipaddress.ip_address(s).is_loopback for s in servers)


def test_nspawn_command_matches_the_documented_boot() -> None:
    argv = supervisor.nspawn_argv("demo")
    for flag in (
        "--register=no",
        "--keep-unit",
        "--network-namespace-path=/run/netns/sdn-demo",
        "-b",
        "--machine=demo",
        "--capability=CAP_NET_ADMIN",
    ):
        assert flag in argv
    assert argv[argv.index("-D") + 1] == str(noderoot.rootfs_path("demo"))
    assert supervisor.nspawn_env()["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] == "network"


def test_nft_ruleset_masquerades_the_subnet_out_of_the_uplink() -> None:
    ruleset = network.nft_ruleset("eth9")
    assert f"table inet {network.NFT_TABLE}" in ruleset
    assert 'ip saddr 10.213.0.0/24 oifname "eth9" masquerade' in ruleset
    assert 'iifname "sdnbr0" accept' in ruleset


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables")
def test_nft_ruleset_is_accepted_by_nft() -> None:
    # -c: parse and check against the kernel without applying anything.
    subprocess.run(["nft", "-c", "-f", "-"], input=network.nft_ruleset("lo"), text=True, check=True)


# --- command line ------------------------------------------------------------------------------------


def test_parser_shapes() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["up", "demo", "--password-login", "--memory", "2G"])
    assert (args.name, args.password_login, args.memory) == ("demo", True, 2 * 2**30)
    assert parser.parse_args(["down", "--all"]).all
    assert parser.parse_args(["ssh", "demo", "--", "uname", "-a"]).cmd == ["uname", "-a"]
    assert parser.parse_args(["ssh", "demo", "uname", "-a"]).cmd == ["uname", "-a"]
    args = parser.parse_args(["_supervise", "demo", "0", "--", "systemd-nspawn", "-b"])
    assert (args.name, args.memory_bytes, args.argv) == ("demo", 0, ["systemd-nspawn", "-b"])
    with pytest.raises(SystemExit):
        parser.parse_args(["down"])


def test_bad_name_is_reported_before_anything_happens(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "Bad_Name"]) == 1
    assert "node name 'Bad_Name'" in capsys.readouterr().err


def as_nobody() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is needed to drop root")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("command", [["host-setup"], ["up", "demo"], ["down", "demo"], ["gc"]])
def test_root_commands_refuse_clearly_without_root(command: list[str], tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    testnode = VENV_BIN / "testnode"
    if not testnode.exists():
        pytest.skip("testnode is not installed in this venv")
    proc = subprocess.run(
        [*as_nobody(), str(testnode), *command],
        capture_output=True,
        text=True,
        env={**os.environ, "SDNODE_STATE_DIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert f"`testnode {command[0]}` needs root" in proc.stderr
    assert "Traceback" not in proc.stderr
