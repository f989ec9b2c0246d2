"""testnode's pure logic: names, addresses, records, known_hosts, inventory, the nft ruleset, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sdnode import testnode as tn

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def nodes_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Node records in a temp dir instead of /var/lib/sdnode/testnodes."""
    path = tmp_path / "nodes"
    monkeypatch.setenv(tn.NODES_ENV, str(path))
    return path


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("SDNODE_STATE_DIR", str(path))
    return path


def running_record(name: str, address: str, state: Path, **kw: object) -> tn.NodeRecord:
    """A record whose 'supervisor' is this test process, so it counts as running."""
    return tn.NodeRecord(
        name=name,
        address=address,
        state_dir=str(state),
        status="up",
        supervisor_pid=os.getpid(),
        supervisor_start=tn.proc_start_time(os.getpid()),
        **kw,
    )


# --- names and addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "demo", "sn1", "node-2", "a" * 32])
def test_valid_names_pass(name: str) -> None:
    assert tn.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "a_b", "a--b", "a-", "-a", "a" * 33, "../x", "a b"])
def test_invalid_names_are_refused_with_the_name(name: str) -> None:
    with pytest.raises(tn.TestnodeError, match="node name"):
        tn.validate_name(name)


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
    assert tn.allocate_address(used) == expected


def test_allocation_fails_clearly_when_the_subnet_is_full() -> None:
    used = [f"10.213.0.{i}" for i in range(10, 255)]
    with pytest.raises(tn.TestnodeError, match="no free address"):
        tn.allocate_address(used)


def test_veth_names_fit_the_kernel_limit_and_are_unique() -> None:
    names = [tn.veth_name(f"10.213.0.{i}") for i in range(10, 255)]
    assert max(len(n) for n in names) <= 15
    assert len(set(names)) == len(names)


def test_mac_addresses_are_fixed_per_address_unique_and_local() -> None:
    macs = [tn.mac_address(f"10.213.0.{i}") for i in range(10, 255)]
    assert len(set(macs)) == len(macs)
    assert tn.mac_address("10.213.0.17") == tn.mac_address("10.213.0.17") == "02:53:44:4e:00:11"
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
    assert tn.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1G", "2X", "", "64M"])
def test_bad_memory_sizes_name_the_option(text: str) -> None:
    with pytest.raises(tn.TestnodeError, match="--memory"):
        tn.parse_memory(text)


# --- processes and records ---------------------------------------------------------------------------


def test_proc_alive_guards_against_pid_reuse() -> None:
    me, start = os.getpid(), tn.proc_start_time(os.getpid())
    assert tn.proc_alive(me, start)
    assert not tn.proc_alive(me, (start or 0) + 1)
    assert not tn.proc_alive(None, None)
    child = subprocess.Popen(["true"])
    child.wait()
    assert not tn.proc_alive(child.pid, None)


def test_record_liveness(nodes_dir: Path, state: Path) -> None:
    me, start = os.getpid(), tn.proc_start_time(os.getpid())
    creating = tn.NodeRecord(
        name="a", address="10.213.0.10", state_dir=str(state), owner_pid=me, owner_start=start
    )
    assert creating.is_live() and not creating.is_running()
    assert tn.node_status(creating) == "creating"
    orphan = tn.NodeRecord(
        name="b", address="10.213.0.11", state_dir=str(state), owner_pid=me, owner_start=(start or 0) + 1
    )
    assert not orphan.is_live()
    dead = tn.NodeRecord(
        name="c",
        address="10.213.0.12",
        state_dir=str(state),
        status="up",
        supervisor_pid=me,
        supervisor_start=(start or 0) + 1,
    )
    assert tn.node_status(dead) == "dead"
    assert tn.node_status(running_record("d", "10.213.0.13", state)) == "running"


def test_records_round_trip_and_ignore_unknown_keys(nodes_dir: Path, state: Path) -> None:
    record = running_record("rt", "10.213.0.10", state, password_login=True, memory=2**30)
    tn.save_record(record)
    assert tn.load_record("rt") == record
    data = json.loads(tn.record_path("rt").read_text())
    data["from_a_newer_version"] = 1
    tn.record_path("rt").write_text(json.dumps(data))
    assert tn.load_record("rt") == record
    assert [r.name for r in tn.load_records()] == ["rt"]
    assert tn.load_record("missing") is None


def test_unreadable_record_points_at_gc(nodes_dir: Path) -> None:
    tn.record_path("bad").parent.mkdir(parents=True)
    tn.record_path("bad").write_text("{not json")
    with pytest.raises(tn.TestnodeError, match="testnode gc"):
        tn.load_record("bad")


def test_stray_processes_are_found_by_node_name() -> None:
    # A stand-in whose command line looks like a supervisor of node "fakenode".
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(60)",
            "sdnode.testnode",
            "_supervise",
            "fakenode",
            "0",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while "fakenode" not in tn.proc_cmdline(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.pid in tn.stray_pids({"fakenode"})
        assert proc.pid not in tn.stray_pids({"othernode"})
        assert tn._node_of_pid(proc.pid) == "fakenode"
    finally:
        proc.kill()
        proc.wait()


def test_processes_are_found_by_root_directory(tmp_path: Path) -> None:
    assert os.getpid() in tn.pids_rooted_at([Path("/")])
    assert os.getpid() not in tn.pids_rooted_at([tmp_path])
    assert tn.pids_rooted_at([tmp_path / "absent"]) == []


# --- per-checkout files ------------------------------------------------------------------------------


def test_known_hosts_replaces_only_the_nodes_address(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("10.213.0.10 ssh-ed25519 OLD\n10.213.0.11 ssh-ed25519 KEEP\n10.213.0.100 ssh-rsa KEEP2\n")
    tn.update_known_hosts(path, "10.213.0.10", ["ssh-ed25519 NEW", "ssh-rsa NEW2"])
    assert path.read_text().splitlines() == [
        "10.213.0.11 ssh-ed25519 KEEP",
        "10.213.0.100 ssh-rsa KEEP2",
        "10.213.0.10 ssh-ed25519 NEW",
        "10.213.0.10 ssh-rsa NEW2",
    ]
    tn.update_known_hosts(path, "10.213.0.10", [])
    assert "10.213.0.10 " not in path.read_text()


def test_write_file_is_atomic_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "d" / "secret"
    tn.write_file(target, "pw\n", 0o600)
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
    tn.save_record(running_record("mine", "10.213.0.10", state))
    tn.save_record(running_record("theirs", "10.213.0.11", tmp_path / "other-checkout"))
    tn.save_record(tn.NodeRecord(name="booting", address="10.213.0.12", state_dir=str(state)))
    path = tn.write_inventory(state)
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
    listed = ansible_inventory_list(tn.write_inventory(state))
    assert "mine" not in listed["_meta"]["hostvars"]
    assert yaml.safe_load(tn.default_inventory_path(state).read_text())["all"]["children"]["sdnodes"]


def test_group_vars_link_applies_test_variables(nodes_dir: Path, state: Path, tmp_path: Path) -> None:
    tn.save_record(running_record("gv", "10.213.0.10", state))
    group_vars = tmp_path / "gv"
    (group_vars / "sdnodes").mkdir(parents=True)
    (group_vars / "sdnodes" / "test.yml").write_text("nvidia_driver_hardware_checks: false\n")
    out = tmp_path / "elsewhere" / "hosts.yml"
    assert tn.write_inventory(state, out, group_vars) == out
    assert (out.parent / "group_vars").resolve() == group_vars
    hostvars = ansible_inventory_list(out)["_meta"]["hostvars"]["gv"]
    assert hostvars["nvidia_driver_hardware_checks"] is False
    # Rewriting with another directory moves the link.
    other = tmp_path / "gv2"
    other.mkdir()
    tn.write_inventory(state, out, other)
    assert (out.parent / "group_vars").resolve() == other


def test_group_vars_never_replaces_a_real_directory(nodes_dir: Path, state: Path, tmp_path: Path) -> None:
    out = tmp_path / "inv" / "hosts.yml"
    (out.parent / "group_vars").mkdir(parents=True)
    with pytest.raises(tn.TestnodeError, match="not a symlink"):
        tn.write_inventory(state, out, tmp_path)
    with pytest.raises(tn.TestnodeError, match="--group-vars"):
        tn.write_inventory(state, tmp_path / "x" / "hosts.yml", tmp_path / "absent")


# --- root filesystem recipe and node files -----------------------------------------------------------


def test_recipe_hash_is_stable_and_tracks_every_input() -> None:
    debian = tn.OS_IMAGES["debian-12"]
    recipe = tn.rootfs_recipe(debian)
    assert tn.recipe_hash(recipe) == tn.recipe_hash(json.loads(json.dumps(recipe)))
    for key, value in [
        ("include", [*recipe["include"], "vim"]),
        ("ca", {"x.crt": "PEM"}),
        ("steps", recipe["steps"] + 1),
        ("mirror", "http://example.org/debian"),
        ("components", ["main", "contrib"]),
        ("keyring", "0" * 64),
    ]:
        assert tn.recipe_hash({**recipe, key: value}) != tn.recipe_hash(recipe), key
    assert tn.rootfs_tarball(debian, recipe).name == f"rootfs-bookworm-{tn.recipe_hash(recipe)}.tar"


def test_recipe_holds_what_ansible_needs() -> None:
    include = set(tn.rootfs_recipe(tn.OS_IMAGES["debian-12"])["include"])
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
    monkeypatch.setattr(tn, "HOST_APT_CONF_DIR", tmp_path)
    assert sorted(tn.host_apt_settings()) == ["01proxy", "99valid"]


def test_sources_cover_updates_and_security() -> None:
    lines = tn.OS_IMAGES["debian-12"].sources_list().splitlines()
    assert "deb http://deb.debian.org/debian bookworm main" in lines
    assert "deb http://deb.debian.org/debian bookworm-updates main" in lines
    assert "deb http://deb.debian.org/debian-security bookworm-security main" in lines
    # Ubuntu's components as on its cloud images: Canonical's NVIDIA driver is in restricted.
    lines = tn.OS_IMAGES["ubuntu-22.04"].sources_list().splitlines()
    assert "deb http://archive.ubuntu.com/ubuntu jammy-updates main restricted universe multiverse" in lines
    assert "deb http://security.ubuntu.com/ubuntu jammy-security main restricted universe multiverse" in lines


def test_each_release_has_its_own_cached_root_filesystem() -> None:
    tarballs = {tn.rootfs_tarball(image).name for image in tn.OS_IMAGES.values()}
    assert len(tarballs) == len(tn.OS_IMAGES)
    assert {t.split("-")[1] for t in tarballs} == {"bookworm", "jammy", "noble"}


def test_up_refuses_an_unknown_release_before_touching_the_host() -> None:
    with pytest.raises(tn.TestnodeError, match=r"debian-12, ubuntu-22\.04, ubuntu-24\.04"):
        tn.up("n1", os_name="centos-9")


def test_sshd_dropin_modes() -> None:
    key_only = tn.sshd_dropin(False)
    assert "PasswordAuthentication no" in key_only and "PermitRootLogin yes" not in key_only
    password = tn.sshd_dropin(True)
    assert "PasswordAuthentication yes" in password and "PermitRootLogin yes" in password


def test_hosts_file_names_the_node() -> None:
    text = tn.hosts_file("demo", "10.213.0.10")
    assert "10.213.0.10\tdemo" in text and "127.0.0.1\tlocalhost" in text


def test_node_resolvers_are_reachable_from_a_namespace() -> None:
    import ipaddress
    import re

    servers = re.findall(r"^\s*nameserver\s+(\S+)", tn.resolv_conf(), re.MULTILINE)
    assert servers and not all(ipaddress.ip_address(s).is_loopback for s in servers)


def test_nspawn_command_matches_the_documented_boot() -> None:
    argv = tn.nspawn_argv("demo")
    for flag in (
        "--register=no",
        "--keep-unit",
        "--network-namespace-path=/run/netns/sdn-demo",
        "-b",
        "--machine=demo",
        "--capability=CAP_NET_ADMIN",
    ):
        assert flag in argv
    assert argv[argv.index("-D") + 1] == str(tn.rootfs_path("demo"))
    assert tn.nspawn_env()["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] == "network"


def test_nft_ruleset_masquerades_the_subnet_out_of_the_uplink() -> None:
    ruleset = tn.nft_ruleset("eth9")
    assert f"table inet {tn.NFT_TABLE}" in ruleset
    assert 'ip saddr 10.213.0.0/24 oifname "eth9" masquerade' in ruleset
    assert 'iifname "sdnbr0" accept' in ruleset


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables")
def test_nft_ruleset_is_accepted_by_nft() -> None:
    # -c: parse and check against the kernel without applying anything.
    subprocess.run(["nft", "-c", "-f", "-"], input=tn.nft_ruleset("lo"), text=True, check=True)


# --- command line ------------------------------------------------------------------------------------


def test_parser_shapes() -> None:
    parser = tn.build_parser()
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
    assert tn.main(["up", "Bad_Name"]) == 1
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
