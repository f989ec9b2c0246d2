"""Throwaway test nodes (Debian 12 by default, Ubuntu 22.04 and 24.04 with --os): systemd-nspawn
containers that look like fresh cloud VMs to Ansible.

Each node boots systemd as PID 1 in its own network namespace, on the private bridge `sdnbr0`
(10.213.0.1/24, nodes from 10.213.0.10), with outbound NAT from the nftables table `inet sdnode_testnodes`.
Root logs in over SSH with a per-run key; host keys are generated per node and written to a known_hosts
file that the generated Ansible inventory uses.

Layout:
- host-wide (shared by every checkout on the machine): node records and root filesystems under
  /var/lib/sdnode/testnodes/<name>/, the bridge, the nftables table, net.ipv4.ip_forward;
- per checkout ($STATE/testnodes/): the key pair, known_hosts, passwords, node logs, the inventory;
- cache: /var/cache/sdnode/rootfs-<suite>-<recipe hash>.tar, built once a release with debootstrap,
  and the same unpacked beside it: the read-only lower layer of every node's overlay root (nodes write only to
  /var/lib/sdnode/testnodes/<name>/upper).

Sections below: helpers, names and addresses, node records, root filesystem cache, network, node rootfs,
supervisor, lifecycle, inventory, gc, host setup, command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from sdnode.state import cache_dir, state_dir

BRIDGE = "sdnbr0"
NETWORK = ipaddress.IPv4Network("10.213.0.0/24")
GATEWAY = ipaddress.IPv4Address("10.213.0.1")
FIRST_NODE_HOST = 10
NFT_TABLE = "sdnode_testnodes"  # family inet
NETNS_PREFIX = "sdn-"
VETH_PREFIX = "sdnv"  # host end: sdnv<last octet>; the node end is eth0 inside the namespace
NODES_ENV = "SDNODE_NODES_DIR"
DEFAULT_NODES_DIR = Path("/var/lib/sdnode/testnodes")
NSPAWN_REBOOT_STATUS = 133
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")
HOST_PACKAGES = ("debootstrap", "systemd-container", "nftables", "iproute2", "openssh-client", "rsync")
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nft": "nftables",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$|^[a-z]$")
GROUP = "sdnodes"
DEFAULT_OS = "debian-12"  # a key of OS_IMAGES

Log = Callable[[str], object]  # where progress messages go


class TestnodeError(Exception):
    """A failure with a message meant for the user."""

    __test__ = False  # not a pytest test class


# ---------------------------------------------------------------------------------------------------
# Helpers


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; on failure raise TestnodeError naming the command and its stderr."""
    argv = [str(a) for a in cmd]
    try:
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as exc:
        raise TestnodeError(f"{argv[0]} not found: run `testnode host-setup` as root") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestnodeError(f"`{shlex.join(argv)}` timed out after {timeout} s") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise TestnodeError(f"`{shlex.join(argv)}` failed with status {result.returncode}: {detail}")
    return result


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise TestnodeError(
            f"`testnode {what}` needs root (network namespaces, nftables, systemd-nspawn); "
            "run it with sudo or as root"
        )


def require_host_tools() -> None:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise TestnodeError(f"missing host packages: {', '.join(missing)}; run `testnode host-setup` as root")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, held for the duration of the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_file(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename) with the given mode, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def proc_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot), or None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def proc_alive(pid: int | None, start: int | None) -> bool:
    """True when `pid` runs and is the same process as recorded (start time guards against pid reuse)."""
    if not pid:
        return False
    now = proc_start_time(pid)
    if now is None:
        return False
    if start is not None and now != start:
        return False
    # A zombie is as good as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def pids_rooted_at(roots: Iterable[Path]) -> list[int]:
    """Processes whose root directory is one of `roots`: what runs inside a node, even after nspawn died."""
    wanted = set()
    for root in roots:
        with contextlib.suppress(OSError):
            st = root.stat()
            wanted.add((st.st_dev, st.st_ino))
    found = []
    for pid in all_pids() if wanted else []:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/root")
            if (st.st_dev, st.st_ino) in wanted:
                found.append(pid)
    return found


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of `pids` runs; True if they all went."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if proc_alive(p, None)}
        if pending:
            time.sleep(0.1)
    return not pending


def parse_memory(value: str) -> int:
    """'512M', '2G', '1.5GiB', '1073741824' -> bytes (binary units, as systemd reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", value, re.IGNORECASE)
    if not match:
        raise TestnodeError(f"--memory: cannot read {value!r}; use a size such as 512M or 2G")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * 1024 ** " KMGT".index(unit or " "))
    if size < 128 * 1024**2:
        raise TestnodeError(f"--memory: {value!r} is below 128M, too little for systemd and sshd")
    return size


# ---------------------------------------------------------------------------------------------------
# Names and addresses


def validate_name(name: str) -> str:
    """Node names become hostnames, machine names and netns names: keep them short DNS labels."""
    if not NAME_RE.fullmatch(name) or "--" in name:
        raise TestnodeError(
            f"node name {name!r}: use 1-32 lowercase letters, digits and single hyphens, "
            "starting with a letter and not ending with a hyphen"
        )
    return name


def allocate_address(used: Iterable[str]) -> str:
    """The lowest free node address, from 10.213.0.10 up."""
    taken = {ipaddress.IPv4Address(a) for a in used}
    for host in range(FIRST_NODE_HOST, NETWORK.num_addresses - 1):
        candidate = NETWORK.network_address + host
        if candidate not in taken:
            return str(candidate)
    raise TestnodeError(f"no free address left in {NETWORK}: bring some nodes down")


def netns_name(name: str) -> str:
    return f"{NETNS_PREFIX}{name}"


def mac_address(address: str) -> str:
    """A fixed, locally administered MAC per address: when an address is reused by a new node, the ARP
    caches of the host and the other nodes stay right (a stale entry would blackhole it for ~30 s)."""
    octets = ipaddress.IPv4Address(address).packed
    return "02:53:44:4e:{:02x}:{:02x}".format(*octets[2:])


def veth_name(address: str) -> str:
    """Host end of a node's veth pair; interface names are limited to 15 characters, addresses are short."""
    return f"{VETH_PREFIX}{address.rsplit('.', 1)[1]}"


# ---------------------------------------------------------------------------------------------------
# Node records (host-wide: one per node, whichever checkout started it)


@dataclasses.dataclass
class NodeRecord:
    name: str
    address: str
    state_dir: str
    status: str = "creating"  # creating -> up
    password_login: bool = False
    memory: int | None = None
    owner_pid: int | None = None  # the `up` process, while creating
    owner_start: int | None = None
    supervisor_pid: int | None = None
    supervisor_start: int | None = None
    cgroup: str | None = None  # memory cgroup made for --memory
    os_name: str = DEFAULT_OS  # a key of OS_IMAGES
    created: float = dataclasses.field(default_factory=time.time)

    def is_live(self) -> bool:
        """Running (its supervisor lives) or being created by a live `up`."""
        if proc_alive(self.supervisor_pid, self.supervisor_start):
            return True
        return self.status == "creating" and proc_alive(self.owner_pid, self.owner_start)

    def is_running(self) -> bool:
        return self.status == "up" and proc_alive(self.supervisor_pid, self.supervisor_start)


def nodes_dir() -> Path:
    override = os.environ.get(NODES_ENV)
    return Path(override) if override else DEFAULT_NODES_DIR


def host_lock() -> contextlib.AbstractContextManager[None]:
    """Serialises allocation and shared network set-up/tear-down among all `testnode` processes."""
    return file_lock(nodes_dir() / ".lock")


def node_dir(name: str) -> Path:
    return nodes_dir() / name


def record_path(name: str) -> Path:
    return node_dir(name) / "node.json"


def load_record(name: str) -> NodeRecord | None:
    try:
        data = json.loads(record_path(name).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, TypeError) as exc:
        raise TestnodeError(
            f"node record {record_path(name)} is unreadable ({exc}); run `testnode gc`"
        ) from exc
    known = {f.name for f in dataclasses.fields(NodeRecord)}
    return NodeRecord(**{k: v for k, v in data.items() if k in known})


def save_record(record: NodeRecord) -> None:
    write_file(record_path(record.name), json.dumps(dataclasses.asdict(record), indent=2) + "\n")


def load_records() -> list[NodeRecord]:
    base = nodes_dir()
    if not base.is_dir():
        return []
    records = []
    for path in sorted(base.glob("*/node.json")):
        with contextlib.suppress(TestnodeError):
            record = load_record(path.parent.name)
            if record is not None:
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------
# Per-checkout files ($STATE/testnodes)


def testnodes_state(base: Path | None = None) -> Path:
    return (base or state_dir()) / "testnodes"


def key_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "id_ed25519"


def known_hosts_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "known_hosts"


def default_inventory_path(base: Path | None = None) -> Path:
    return testnodes_state(base) / "inventory" / "hosts.yml"


def state_lock(base: Path | None = None) -> contextlib.AbstractContextManager[None]:
    return file_lock(testnodes_state(base) / ".lock")


def ensure_key(base: Path) -> Path:
    key = key_path(base)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(key.parent, 0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testnode", "-f", key])
    return key


def update_known_hosts(path: Path, address: str, host_keys: Sequence[str]) -> None:
    """Replace every line for `address` with the node's current host keys ("type base64" strings)."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(" ", 1)[0] != address]
    kept.extend(f"{address} {key}" for key in host_keys)
    write_file(path, "".join(f"{line}\n" for line in kept), 0o644)


def ssh_base_args(
    base: Path, address: str, *, batch: bool = True, connect_timeout: int | None = None
) -> list[str]:
    args = [
        "ssh",
        "-i",
        str(key_path(base)),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts_path(base)}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "LogLevel=ERROR",
    ]
    if batch:
        args += ["-o", "BatchMode=yes"]
    if connect_timeout is not None:
        args += ["-o", f"ConnectTimeout={connect_timeout}"]
    return [*args, f"root@{address}"]


# ---------------------------------------------------------------------------------------------------
# Root filesystem cache

# What a fresh cloud image offers Ansible: systemd, sshd with sftp, python3, sudo, basic tools.
INCLUDE = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "openssh-sftp-server",
    "python3",
    "sudo",
    "iproute2",
    "ca-certificates",
    "netbase",
    "procps",
    "iputils-ping",
    "curl",
    "gnupg",
    "less",
    "xz-utils",
)


@dataclasses.dataclass(frozen=True)
class OsImage:
    """A distribution release a node can run, and where debootstrap gets it."""

    name: str  # what `testnode up --os` takes
    suite: str
    mirror: str
    security_mirror: str
    security_suite: str
    components: tuple[str, ...] = ("main",)
    # Ubuntu's archive key, which Debian's host does not carry: from Ubuntu's own package, pinned.
    keyring_deb: str | None = None
    keyring_deb_sha256: str | None = None

    def sources_list(self) -> str:
        parts = " ".join(self.components)
        return (
            f"deb {self.mirror} {self.suite} {parts}\n"
            f"deb {self.mirror} {self.suite}-updates {parts}\n"
            f"deb {self.security_mirror} {self.security_suite} {parts}\n"
        )


_UBUNTU_KEYRING = (
    "http://archive.ubuntu.com/ubuntu/pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb",
    "36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8",
)
OS_IMAGES = {
    image.name: image
    for image in (
        OsImage(
            "debian-12",
            "bookworm",
            "http://deb.debian.org/debian",
            "http://deb.debian.org/debian-security",
            "bookworm-security",
        ),
        *(
            OsImage(
                name,
                suite,
                "http://archive.ubuntu.com/ubuntu",
                "http://security.ubuntu.com/ubuntu",
                f"{suite}-security",
                # As on Ubuntu's cloud images; restricted holds Canonical's NVIDIA driver packages.
                components=("main", "restricted", "universe", "multiverse"),
                keyring_deb=_UBUNTU_KEYRING[0],
                keyring_deb_sha256=_UBUNTU_KEYRING[1],
            )
            for name, suite in (("ubuntu-22.04", "jammy"), ("ubuntu-24.04", "noble"))
        ),
    )
}
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
HOST_APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
# Host apt settings worth mirroring into nodes: the proxy and the archive-validity relaxations it needs.
APT_SETTING_RE = re.compile(r"Acquire::(https?::Proxy|Check-Valid-Until|Check-Date)", re.IGNORECASE)
BUILD_STEPS_VERSION = 1  # bump when build_rootfs changes what it puts into the tarball


def host_ca_certs() -> dict[str, str]:
    if not HOST_CA_DIR.is_dir():
        return {}
    return {str(p.relative_to(HOST_CA_DIR)): p.read_text() for p in sorted(HOST_CA_DIR.rglob("*.crt"))}


def host_apt_settings() -> dict[str, str]:
    if not HOST_APT_CONF_DIR.is_dir():
        return {}
    found = {}
    for path in sorted(HOST_APT_CONF_DIR.iterdir()):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text()
            if path.is_file() and APT_SETTING_RE.search(text):
                found[path.name] = text
    return found


def rootfs_recipe(image: OsImage) -> dict[str, Any]:
    """Everything that decides the tarball's content; its hash names the cache file."""
    return {
        "suite": image.suite,
        "variant": "minbase",
        "mirror": image.mirror,
        "security": image.security_mirror,
        "components": list(image.components),
        "keyring": image.keyring_deb_sha256,
        "include": sorted(INCLUDE),
        "steps": BUILD_STEPS_VERSION,
        "ca": host_ca_certs(),
        "apt": host_apt_settings(),
    }


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_tarball(image: OsImage, recipe: dict[str, Any] | None = None) -> Path:
    return cache_dir() / f"rootfs-{image.suite}-{recipe_hash(recipe or rootfs_recipe(image))}.tar"


def ensure_rootfs_tarball(image: OsImage, log: Log = print) -> Path:
    """Build the cached root filesystem once (about a minute); concurrent callers wait for one build."""
    recipe = rootfs_recipe(image)
    tarball = rootfs_tarball(image, recipe)
    if tarball.exists():
        return tarball
    with file_lock(cache_dir() / ".rootfs.lock"):
        if tarball.exists():  # built by another process while we waited
            return tarball
        log(f"building the {image.name} root filesystem (once; cached as {tarball}) ...")
        started = time.monotonic()
        # Built in a temp dir and renamed into place, so an interrupted build never leaves a bad cache.
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".build-") as tmp:
            root = Path(tmp) / "root"
            build_rootfs(root, image, recipe, Path(tmp))
            partial = Path(tmp) / "rootfs.tar"
            run(["tar", "-C", root, "--numeric-owner", "-cf", partial, "."])
            os.replace(partial, tarball)
        for old in cache_dir().glob(f"rootfs-{image.suite}-*.tar"):
            if old != tarball:
                old.unlink()
        log(f"built {tarball} in {time.monotonic() - started:.0f} s")
    return tarball


def archive_keyring(image: OsImage, workdir: Path) -> Path:
    """The distribution's archive keyring, taken from its keyring package (checked against the pinned
    sha256), for a distribution whose key the host does not have."""
    assert image.keyring_deb and image.keyring_deb_sha256
    deb = workdir / "keyring.deb"
    run(["curl", "-fsSL", "--retry", "3", "-o", deb, image.keyring_deb], timeout=300)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != image.keyring_deb_sha256:
        raise TestnodeError(f"{image.keyring_deb}: sha256 {digest}, expected {image.keyring_deb_sha256}")
    run(["dpkg-deb", "-x", deb, workdir / "keyring"])
    return workdir / "keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg"


def debootstrap_script(image: OsImage) -> list[str]:
    """Older debootstrap releases lack the newer Ubuntu suites; every Ubuntu suite since 7.10 uses gutsy's."""
    scripts = Path("/usr/share/debootstrap/scripts")
    if image.keyring_deb is None or (scripts / image.suite).exists():
        return []
    return [str(scripts / "gutsy")]


def build_rootfs(root: Path, image: OsImage, recipe: dict[str, Any], workdir: Path) -> None:
    keyring = [f"--keyring={archive_keyring(image, workdir)}"] if image.keyring_deb else []
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--components={','.join(image.components)}",
            f"--include={','.join(recipe['include'])}",
            *keyring,
            image.suite,
            root,
            image.mirror,
            *debootstrap_script(image),
        ],
        timeout=1800,
    )
    (root / "etc/apt/sources.list").write_text(image.sources_list())
    # 24.04's cloud images list the archive in deb822 form; should a package write that here, one list stays.
    (root / "etc/apt/sources.list.d/ubuntu.sources").unlink(missing_ok=True)
    for name, text in recipe["apt"].items():
        (root / "etc/apt/apt.conf.d" / f"50sdnode-host-{name}").write_text(text)
    # Trust the controller's CA certificates (outbound TLS here goes through an intercepting proxy).
    for rel, text in recipe["ca"].items():
        dest = root / "usr/local/share/ca-certificates" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    run(["chroot", root, "update-ca-certificates"])
    # Per-node identity is written at `up`: no shared host keys or machine-id in the tarball.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    run(["chroot", root, "apt-get", "clean"])


# ---------------------------------------------------------------------------------------------------
# Network


def uplink_interface() -> str:
    routes = json.loads(run(["ip", "-j", "route", "show", "default"]).stdout or "[]")
    for route in routes:
        if route.get("dev"):
            return str(route["dev"])
    raise TestnodeError("no default route on the host: nodes would have no way out")


def nft_ruleset(uplink: str) -> str:
    """The whole table, replaced atomically (declare, delete, re-create in one transaction)."""
    return f"""table inet {NFT_TABLE} {{}}
delete table inet {NFT_TABLE}
table inet {NFT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {NETWORK} oifname "{uplink}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{BRIDGE}" accept
        oifname "{BRIDGE}" ct state established,related accept
    }}
}}
"""


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def ip_forward_path() -> Path:
    return Path("/proc/sys/net/ipv4/ip_forward")


def ip_forward_saved() -> Path:
    return nodes_dir() / "ip_forward.orig"


def setup_shared_network() -> None:
    """Bridge, NAT table, ip_forward (recording its old value once). Call under host_lock."""
    if not link_exists(BRIDGE):
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    # A bridge takes the lowest MAC of its ports unless given one: nodes coming and going would change
    # the gateway's MAC under the other nodes' ARP caches.
    if mac_address(str(GATEWAY)) not in run(["ip", "link", "show", "dev", BRIDGE]).stdout:
        run(["ip", "link", "set", "dev", BRIDGE, "address", mac_address(str(GATEWAY))])
    current = run(["ip", "-j", "-4", "addr", "show", "dev", BRIDGE]).stdout
    if f'"{GATEWAY}"' not in current:
        run(["ip", "addr", "add", f"{GATEWAY}/{NETWORK.prefixlen}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    run(["nft", "-f", "-"], input=nft_ruleset(uplink_interface()))
    saved = ip_forward_saved()
    if not saved.exists():
        write_file(saved, ip_forward_path().read_text())
    ip_forward_path().write_text("1\n")


def teardown_shared_network() -> None:
    """Undo setup_shared_network. Call under host_lock, only when no live node remains."""
    if run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0:
        run(["nft", "delete", "table", "inet", NFT_TABLE])
    if link_exists(BRIDGE):
        run(["ip", "link", "delete", BRIDGE])
    saved = ip_forward_saved()
    if saved.exists():
        ip_forward_path().write_text(saved.read_text())
        saved.unlink()


def netns_list() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def setup_node_network(name: str, address: str) -> None:
    ns, veth = netns_name(name), veth_name(address)
    remove_node_network(name, address)  # leftovers of a killed run under the same name or address
    run(["ip", "netns", "add", ns])
    run(
        [
            "ip",
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "address",
            mac_address(address),
            "netns",
            ns,
        ]
    )
    run(["ip", "neigh", "flush", "to", address, "dev", BRIDGE], check=False)
    run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    run(["ip", "-n", ns, "route", "add", "default", "via", str(GATEWAY)])


def netns_pids(ns: str) -> list[int]:
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split()]


def remove_node_network(name: str, address: str | None) -> None:
    ns = netns_name(name)
    if ns in netns_list():
        for pid in netns_pids(ns):
            kill_quietly(pid)
        run(["ip", "netns", "delete", ns])  # takes the veth pair with it
    # The kernel destroys a deleted namespace (and the veth pair with it) asynchronously.
    if address and link_exists(veth_name(address)):
        result = run(["ip", "link", "delete", veth_name(address)], check=False)
        if result.returncode != 0 and link_exists(veth_name(address)):
            raise TestnodeError(f"cannot delete link {veth_name(address)}: {result.stderr.strip()}")


# ---------------------------------------------------------------------------------------------------
# Node root filesystem


def rootfs_path(name: str) -> Path:
    return node_dir(name) / "rootfs"


def resolv_conf() -> str:
    """The host's resolvers, unless they are loopback-only (unreachable from a node's namespace)."""
    for candidate in (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")):
        with contextlib.suppress(OSError):
            text = candidate.read_text()
            servers = re.findall(r"^\s*nameserver\s+(\S+)", text, re.MULTILINE)
            if servers and not all(ipaddress.ip_address(s).is_loopback for s in servers):
                return text
    return "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"


def hosts_file(name: str, address: str) -> str:
    return (
        f"127.0.0.1\tlocalhost\n{address}\t{name}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )


def sshd_dropin(password_login: bool) -> str:
    # Like the drop-in of Ubuntu's cloud images: the node's base config stays the distribution's own.
    if password_login:
        return "# testnode --password-login\nPasswordAuthentication yes\nPermitRootLogin yes\n"
    return "# testnode: root by key only\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"


def base_tree(tarball: Path) -> Path:
    """The cached tarball unpacked once: the read-only lower layer that every node's overlay shares."""
    tree = tarball.with_suffix("")
    if tree.is_dir():
        return tree
    with file_lock(cache_dir() / ".rootfs.lock"):
        if tree.is_dir():
            return tree
        # Unpacked beside it and renamed into place: a tree under that name is always complete.
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".extract-"))
        try:
            run(["tar", "-C", tmp, "--numeric-owner", "-xpf", tarball])
            os.chmod(tmp, 0o755)
            os.rename(tmp, tree)
        except BaseException:
            remove_tree(tmp)
            raise
    return tree


def mount_rootfs(name: str, tarball: Path) -> str:
    """The node's root: an overlay over the shared tree (no copy: fast even on a busy disk), or, where
    overlayfs is unavailable, a private copy unpacked from the tarball. Returns which."""
    root, upper, work = rootfs_path(name), node_dir(name) / "upper", node_dir(name) / "work"
    unmount_node(name)
    for path in (root, upper, work):
        if path.exists():
            remove_tree(path)
        path.mkdir(parents=True)
    lower = base_tree(tarball)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if run(["mount", "-t", "overlay", f"sdnode-{name}", "-o", options, root], check=False).returncode == 0:
        return "overlay"
    upper.rmdir()
    work.rmdir()
    run(["tar", "-C", root, "--numeric-owner", "-xpf", tarball])
    return "copy"


def mount_points_under(path: Path) -> list[str]:
    """Mount points below `path`, deepest first (the order to unmount them in)."""
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return sorted((p for p in points if p.startswith(f"{path}/")), reverse=True)


def node_mounts(name: str | None = None) -> list[str]:
    """Mount points under a node's directory (under every node's when name is None)."""
    return mount_points_under(node_dir(name) if name else nodes_dir())


def unmount_node(name: str | None = None) -> None:
    for point in node_mounts(name):
        if run(["umount", point], check=False).returncode != 0:
            run(["umount", "-l", point], check=False)


def prepare_rootfs(name: str, address: str, tarball: Path, base: Path, password: str | None) -> list[str]:
    """Lay out the node's root and give it its own identity; returns its public host keys."""
    mount_rootfs(name, tarball)
    root = rootfs_path(name)
    # Key generation (RSA takes seconds on a busy machine) runs while the rest is written.
    keygens = {}
    for kind in ("ed25519", "ecdsa", "rsa"):
        argv = [
            "ssh-keygen",
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-C",
            f"root@{name}",
            "-f",
            str(root / f"etc/ssh/ssh_host_{kind}_key"),
        ]
        keygens[kind] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
    (root / "etc/hostname").write_text(name + "\n")
    (root / "etc/hosts").write_text(hosts_file(name, address))
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text(resolv_conf())
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    authorized = ssh_dir / "authorized_keys"
    authorized.write_text(Path(f"{key_path(base)}.pub").read_text())
    os.chmod(authorized, 0o600)
    (root / "etc/ssh/sshd_config.d/60-testnode.conf").write_text(sshd_dropin(password is not None))
    if password is not None:
        run(["chroot", root, "chpasswd"], input=f"root:{password}\n")
    host_keys = []
    for kind, proc in keygens.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise TestnodeError(f"ssh-keygen -t {kind} failed: {out.decode(errors='replace').strip()}")
        pub = root / f"etc/ssh/ssh_host_{kind}_key.pub"
        host_keys.append(" ".join(pub.read_text().split()[:2]))
    return host_keys


def remove_tree(path: Path) -> None:
    # --one-file-system: never follow into a mount that something left inside a root filesystem.
    run(["rm", "-rf", "--one-file-system", path])


def trash_dir() -> Path:
    return nodes_dir() / ".trash"


def trash_being_deleted() -> set[Path]:
    """Trash entries a background `rm` (started by discard_tree) is deleting right now."""
    busy = set()
    for pid in all_pids():
        argv = proc_cmdline(pid)
        if argv[:3] == ["rm", "-rf", "--one-file-system"] and len(argv) == 4:
            path = Path(argv[3])
            if path.parent == trash_dir():
                busy.add(path)
    return busy


def discard_tree(path: Path) -> None:
    """Move a node's tree out of the way at once and delete it in the background: removing a used root
    filesystem can take many seconds on a busy disk, and `down` should not wait for it. gc finishes
    whatever a killed deletion left in the trash."""
    target = trash_dir() / f"{path.name}-{secrets.token_hex(4)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    subprocess.Popen(
        ["rm", "-rf", "--one-file-system", str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# ---------------------------------------------------------------------------------------------------
# Supervisor: keeps systemd-nspawn running across reboots (status 133), stops on anything else


def nspawn_argv(name: str) -> list[str]:
    return [
        "systemd-nspawn",
        "--register=no",
        "--keep-unit",
        f"--network-namespace-path=/run/netns/{netns_name(name)}",
        "-b",
        "-D",
        str(rootfs_path(name)),
        f"--machine={name}",
        # a private netns already implies CAP_NET_ADMIN; explicit so the node's nftables is testable
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=read-only",
    ]


def nspawn_env() -> dict[str, str]:
    # /proc/sys/net writable (the node's own netns), so sysctl for net.* works like on a VM; the rest of
    # /proc/sys stays read-only: it is the host's kernel.
    return {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}


def memory_cgroup(name: str) -> Path | None:
    """A cgroup (v1 memory controller or v2) below our own, for --memory; None if none is usable."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            mount = Path("/sys/fs/cgroup/memory")
            if mount.is_dir():
                return mount / path.lstrip("/") / f"sdnode-{name}"
    unified = Path("/sys/fs/cgroup/cgroup.controllers")
    if unified.exists() and "memory" in unified.read_text().split():
        own = next(
            line.split("::", 1)[1]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        return Path("/sys/fs/cgroup") / own.lstrip("/") / f"sdnode-{name}"
    return None


def limit_memory(name: str, limit: int) -> None:
    group = memory_cgroup(name)
    if group is None:
        raise TestnodeError("--memory: no memory cgroup controller on this host")
    group.mkdir(exist_ok=True)
    v1 = (group / "memory.limit_in_bytes").exists()
    (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(limit))
    (group / "cgroup.procs").write_text(str(os.getpid()))


def supervise(name: str, argv: list[str], memory: int | None) -> int:
    if memory:
        limit_memory(name, memory)
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # nspawn halts the container in an orderly way

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    while True:
        print(f"supervisor: starting {shlex.join(argv)}", flush=True)
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=nspawn_env())
        status = child.wait()
        print(f"supervisor: systemd-nspawn exited with status {status}", flush=True)
        if status != NSPAWN_REBOOT_STATUS or stopping:
            return 0 if stopping else status
        print("supervisor: node rebooted, starting it again", flush=True)


def start_supervisor(record: NodeRecord, base: Path) -> None:
    log = testnodes_state(base) / f"{record.name}.log"
    # The node name right after `_supervise`: gc and down find supervisors by it.
    argv = [sys.executable, "-m", "sdnode.testnode", "_supervise", record.name, str(record.memory or 0)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*argv, "--", *nspawn_argv(record.name)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    record.supervisor_pid = proc.pid
    record.supervisor_start = proc_start_time(proc.pid)


# ---------------------------------------------------------------------------------------------------
# Lifecycle


def log_tail(base: Path, name: str, lines: int = 30) -> str:
    path = testnodes_state(base) / f"{name}.log"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def wait_ready(record: NodeRecord, base: Path, timeout: float = READY_TIMEOUT_S) -> str:
    """Wait until systemd reports the boot finished (running or degraded) and SSH answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc_alive(record.supervisor_pid, record.supervisor_start):
            raise TestnodeError(
                f"node {record.name} stopped while booting; log tail:\n{log_tail(base, record.name)}"
            )
        result = run(
            [
                *ssh_base_args(base, record.address, connect_timeout=2),
                "systemctl",
                "is-system-running",
                "--wait",
            ],
            check=False,
            timeout=max(5.0, deadline - time.monotonic()),
        )
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return state
        last = state or result.stderr.strip()
        time.sleep(0.3)
    raise TestnodeError(
        f"node {record.name} not ready after {timeout:.0f} s (last: {last}); log tail:\n"
        f"{log_tail(base, record.name)}"
    )


def up(
    name: str,
    *,
    password_login: bool = False,
    memory: int | None = None,
    os_name: str = DEFAULT_OS,
    log: Log = print,
) -> NodeRecord:
    validate_name(name)
    if os_name not in OS_IMAGES:
        raise TestnodeError(f"--os {os_name!r}: choose one of {', '.join(OS_IMAGES)}")
    require_root("up")
    require_host_tools()
    base = state_dir()
    tarball = ensure_rootfs_tarball(OS_IMAGES[os_name], log)
    try:
        record = _claim(name, base, password_login, memory, os_name)
        if record.status == "up":
            log(f"{name} is already up at {record.address}")
            write_inventory(base)
            return record
        started = time.monotonic()
        with host_lock():
            ensure_key(base)
            setup_shared_network()
            setup_node_network(name, record.address)
        password = secrets.token_urlsafe(18) if password_login else None
        host_keys = prepare_rootfs(name, record.address, tarball, base, password)
        pw_file = testnodes_state(base) / f"{name}.password"
        if password is not None:
            write_file(pw_file, password + "\n", 0o600)
        else:
            pw_file.unlink(missing_ok=True)
        with state_lock(base):
            update_known_hosts(known_hosts_path(base), record.address, host_keys)
        prepared = time.monotonic() - started
        start_supervisor(record, base)
        save_record(record)
        state = wait_ready(record, base)
        record.status = "up"
        record.owner_pid = record.owner_start = None
        save_record(record)
        write_inventory(base)
        total = time.monotonic() - started
        log(
            f"{name} is up at {record.address} (systemd {state}; {total:.1f} s: {prepared:.1f} s to prepare, "
            f"{total - prepared:.1f} s to boot)"
        )
        return record
    except BaseException:
        # Interrupted or failed half-way: leave nothing behind (down takes the host lock itself), but
        # only if this process made the node: never someone else's running one.
        with contextlib.suppress(Exception):
            mine = load_record(name)
            if mine is not None and mine.status == "creating" and mine.owner_pid == os.getpid():
                down(name, log=lambda _msg: None)
        raise


def _claim(name: str, base: Path, password_login: bool, memory: int | None, os_name: str) -> NodeRecord:
    """The node's record: the running one, or a new one with the lowest free address (status creating)."""
    with host_lock():
        existing = load_record(name)
        if existing is not None and existing.is_live():
            if existing.state_dir != str(base):
                raise TestnodeError(
                    f"node {name} exists and belongs to {existing.state_dir}; pick another "
                    "name or `testnode down` it from there"
                )
            if existing.status == "up" and existing.os_name != os_name:
                raise TestnodeError(
                    f"node {name} runs {existing.os_name}, not {os_name}; `testnode down {name}` first"
                )
            if existing.status == "up":
                return existing
            raise TestnodeError(f"node {name} is being created by process {existing.owner_pid}")
        if existing is not None:  # a dead leftover: clear it, then start afresh
            _remove_node_resources(existing.name, existing.address, existing.cgroup)
        used = [r.address for r in load_records() if r.name != name and r.is_live()]
        record = NodeRecord(
            name=name,
            address=allocate_address(used),
            state_dir=str(base),
            password_login=password_login,
            memory=memory,
            os_name=os_name,
            owner_pid=os.getpid(),
            owner_start=proc_start_time(os.getpid()),
        )
        if memory:
            group = memory_cgroup(name)
            if group is None:
                raise TestnodeError("--memory: no memory cgroup controller on this host")
            record.cgroup = str(group)
        # From here on the address is taken, and a concurrent down or gc keeps the shared network.
        save_record(record)
    return record


def _stop_processes(record: NodeRecord) -> None:
    """Halt the node (SIGTERM to the supervisor, which nspawn turns into an orderly halt), then force."""
    if proc_alive(record.supervisor_pid, record.supervisor_start):
        assert record.supervisor_pid is not None
        kill_quietly(record.supervisor_pid, signal.SIGTERM)
        if wait_gone([record.supervisor_pid], STOP_TIMEOUT_S):
            return
    kill_node_processes(record.name)


def kill_node_processes(name: str) -> None:
    """SIGKILL a node's supervisor, nspawn and everything inside it; the container's init outlives a
    killed nspawn, so processes are found by their root directory and network namespace too."""
    pids = set(stray_pids({name})) | set(pids_rooted_at([rootfs_path(name)]))
    if netns_name(name) in netns_list():
        pids |= set(netns_pids(netns_name(name)))
    pids.discard(os.getpid())
    for pid in pids:
        kill_quietly(pid)
    wait_gone(pids, 5)


def stray_pids(names: set[str] | None) -> list[int]:
    """Supervisor and nspawn processes of the given nodes (all nodes when `names` is None)."""
    found = []
    for pid in all_pids():
        argv = proc_cmdline(pid)
        node = None
        if "_supervise" in argv and any("sdnode.testnode" in a for a in argv):
            idx = argv.index("_supervise")
            node = argv[idx + 1] if idx + 1 < len(argv) else None
        elif argv and argv[0].endswith("systemd-nspawn"):
            for arg in argv:
                if arg.startswith(f"--network-namespace-path=/run/netns/{NETNS_PREFIX}"):
                    node = arg.split(f"/run/netns/{NETNS_PREFIX}", 1)[1]
        if node is not None and (names is None or node in names) and pid != os.getpid():
            found.append(pid)
    return found


def _remove_node_resources(name: str, address: str | None, cgroup: str | None = None) -> None:
    kill_node_processes(name)
    unmount_node(name)
    remove_node_network(name, address)
    # nspawn leaves this (empty) behind when /run is not a tmpfs, as on these machines.
    with contextlib.suppress(OSError):
        (NSPAWN_PROPAGATE / name).rmdir()
    if node_dir(name).exists():
        discard_tree(node_dir(name))
    if cgroup:
        remove_cgroup(Path(cgroup))


def remove_cgroup(group: Path) -> None:
    # Just-killed tasks may linger a moment in the group (rmdir: EBUSY).
    for _ in range(20):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"testnode: warning: could not remove cgroup {group}", file=sys.stderr)


def down(name: str, *, log: Log = print) -> bool:
    """Stop a node and remove everything it made; True if there was a node. Idempotent."""
    validate_name(name)
    require_root("down")
    record = load_record(name)
    if record is None:
        with host_lock():
            _remove_node_resources(name, None)
            _teardown_if_last()
        log(f"{name}: no such node")
        return False
    _stop_processes(record)
    with host_lock():
        _remove_node_resources(name, record.address, record.cgroup)
        _teardown_if_last()
    _forget_in_state(record)
    log(f"{name} is down")
    return True


def _forget_in_state(record: NodeRecord) -> None:
    """Drop a removed node from its checkout's known_hosts, passwords and inventory."""
    base = Path(record.state_dir)
    if not testnodes_state(base).is_dir():
        return
    with state_lock(base):
        update_known_hosts(known_hosts_path(base), record.address, [])
    (testnodes_state(base) / f"{record.name}.password").unlink(missing_ok=True)
    write_inventory(base)


def _teardown_if_last() -> None:
    if not any(r.is_live() for r in load_records()):
        teardown_shared_network()


def node_status(record: NodeRecord) -> str:
    if record.is_running():
        return "running"
    return "creating" if record.is_live() else "dead"


def list_nodes(base: Path) -> list[dict[str, Any]]:
    return [
        {
            "name": r.name,
            "address": r.address,
            "status": node_status(r),
            "password_login": r.password_login,
            "os": r.os_name,
            "state_dir": r.state_dir,
            "mine": r.state_dir == str(base),
        }
        for r in load_records()
    ]


def find_own_node(name: str, base: Path) -> NodeRecord:
    record = load_record(validate_name(name))
    if record is None or not record.is_running():
        raise TestnodeError(f"node {name} is not running; start it with `testnode up {name}`")
    if record.state_dir != str(base):
        raise TestnodeError(f"node {name} belongs to {record.state_dir}; set SDNODE_STATE_DIR to reach it")
    return record


# ---------------------------------------------------------------------------------------------------
# Inventory


def inventory_data(records: Iterable[NodeRecord], base: Path) -> dict[str, Any]:
    hosts = {}
    for record in sorted(records, key=lambda r: r.name):
        hosts[record.name] = {
            "ansible_host": record.address,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(key_path(base)),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={known_hosts_path(base)} "
            "-o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": "/usr/bin/python3",
            "sdnode_accelerator": "cpu",
        }
    return {"all": {"children": {GROUP: {"hosts": hosts or None}}}}


def write_inventory(base: Path, output: Path | None = None, group_vars: Path | None = None) -> Path:
    """Write the inventory of this checkout's running nodes; with group_vars, link it beside the file."""
    path = (output or default_inventory_path(base)).resolve()
    records = [r for r in load_records() if r.state_dir == str(base) and r.is_running()]
    header = "# Written by `testnode inventory`: the running test nodes of this checkout. Do not edit.\n"
    with state_lock(base):
        write_file(path, header + yaml.safe_dump(inventory_data(records, base), sort_keys=False, width=1000))
    if group_vars is not None:
        target = group_vars.resolve()
        if not target.is_dir():
            raise TestnodeError(f"--group-vars: {group_vars} is not a directory")
        link = path.parent / "group_vars"
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise TestnodeError(f"{link} exists and is not a symlink; remove it or choose another --output")
        link.symlink_to(target)
    return path


# ---------------------------------------------------------------------------------------------------
# gc: remove what killed runs left behind, never touching live nodes


def gc(log: Log = print) -> list[str]:
    require_root("gc")
    removed: list[str] = []
    with host_lock():
        records = load_records()
        live = {r.name for r in records if r.is_live()}
        # Live nodes whose checkout's state (and so their key) is gone can never be reached again.
        for record in records:
            if record.name in live and not key_path(Path(record.state_dir)).exists():
                _stop_processes(record)
                live.discard(record.name)
                removed.append(f"orphaned node {record.name} (state {record.state_dir} is gone)")
        dead = [r for r in records if r.name not in live]
        for record in dead:
            _remove_node_resources(record.name, record.address, record.cgroup)
            removed.append(f"node {record.name} ({record.address})")
        for pid in stray_pids(None):
            node = _node_of_pid(pid)
            if node not in live:
                kill_quietly(pid)
                removed.append(f"process {pid} ({node})")
        for ns in netns_list():
            if ns.startswith(NETNS_PREFIX) and ns[len(NETNS_PREFIX) :] not in live:
                remove_node_network(ns[len(NETNS_PREFIX) :], None)
                removed.append(f"netns {ns}")
        live_veths = {veth_name(r.address) for r in records if r.name in live}
        links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
        for link in links:
            ifname = link.get("ifname", "")
            if re.fullmatch(rf"{VETH_PREFIX}\d+", ifname) and ifname not in live_veths:
                run(["ip", "link", "delete", ifname], check=False)
                removed.append(f"link {ifname}")
        base = nodes_dir()
        if base.is_dir():
            for entry in sorted(base.iterdir()):
                if entry.is_dir() and not entry.name.startswith(".") and entry.name not in live:
                    kill_node_processes(entry.name)
                    unmount_node(entry.name)
                    discard_tree(entry)
                    removed.append(f"node dir {entry}")
        removed += _gc_rootfs_builds()
        if NSPAWN_PROPAGATE.is_dir():
            for entry in NSPAWN_PROPAGATE.iterdir():
                if entry.name not in live and NAME_RE.fullmatch(entry.name):
                    with contextlib.suppress(OSError):  # only empty ones: nspawn's, not in use
                        entry.rmdir()
                        removed.append(f"nspawn leftover {entry}")
        if trash_dir().is_dir():
            busy = trash_being_deleted()
            for entry in sorted(trash_dir().iterdir()):
                if entry not in busy:  # a background deletion that was killed
                    run(["rm", "-rf", "--one-file-system", entry], check=False)
                    removed.append(f"trash {entry}")
        group = memory_cgroup("x")
        if group is not None and group.parent.is_dir():
            for stale in group.parent.glob("sdnode-*"):
                if stale.name.removeprefix("sdnode-") not in live:
                    remove_cgroup(stale)
                    removed.append(f"cgroup {stale}")
        if not live:
            had_shared = (
                link_exists(BRIDGE)
                or ip_forward_saved().exists()
                or run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0
            )
            teardown_shared_network()
            if had_shared:
                removed.append(f"bridge {BRIDGE}, table inet {NFT_TABLE}, ip_forward restored")
    for record in dead:
        _forget_in_state(record)
    for item in removed:
        log(f"removed {item}")
    if not removed:
        log("nothing to clean")
    return removed


def _gc_rootfs_builds() -> list[str]:
    """Remove root filesystem builds a killed `up` left in the cache (debootstrap may leave /proc and
    /sys mounted inside), unless a build is running right now."""
    cache = cache_dir()
    if not cache.is_dir():
        return []
    builds = sorted([*cache.glob(".build-*"), *cache.glob(".extract-*")])
    with open(cache / ".rootfs.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # a build is in progress
        removed = []
        current = {rootfs_tarball(image).with_suffix("") for image in OS_IMAGES.values()}
        mount_table = Path("/proc/self/mounts").read_text()
        for tree in cache.glob("rootfs-*"):
            # Trees of an older recipe, once no node's overlay sits on them.
            if tree.is_dir() and tree not in current and f"lowerdir={tree}," not in mount_table:
                remove_tree(tree)
                removed.append(f"old root filesystem {tree}")
        for build in builds:
            for point in mount_points_under(build):
                run(["umount", "-l", point], check=False)
            remove_tree(build)
            removed.append(f"unfinished build {build}")
        return removed


def _node_of_pid(pid: int) -> str | None:
    argv = proc_cmdline(pid)
    if "_supervise" in argv:
        idx = argv.index("_supervise")
        return argv[idx + 1] if idx + 1 < len(argv) else None
    for arg in argv:
        if arg.startswith(f"--network-namespace-path=/run/netns/{NETNS_PREFIX}"):
            return arg.split(f"/run/netns/{NETNS_PREFIX}", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------------
# Host setup


def missing_host_packages() -> list[str]:
    missing = []
    for package in HOST_PACKAGES:
        result = run(["dpkg-query", "-W", "-f=${Status}", package], check=False)
        if result.returncode != 0 or "install ok installed" not in result.stdout:
            missing.append(package)
    return missing


def host_setup(log: Log = print) -> list[str]:
    require_root("host-setup")
    missing = missing_host_packages()
    if not missing:
        log(f"host packages present: {', '.join(HOST_PACKAGES)}")
        return []
    log(f"installing {', '.join(missing)} ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600)
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, timeout=1200)
    log(f"installed {', '.join(missing)}")
    return missing


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testnode",
        description="Throwaway Debian 12 and Ubuntu test nodes "
        "(systemd-nspawn) that Ansible and testinfra can deploy to.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("up", help="start a node (idempotent) and print its address")
    p.add_argument("name")
    p.add_argument(
        "--password-login",
        action="store_true",
        help="give root a random password ($STATE/testnodes/NAME.password), allowed over SSH",
    )
    p.add_argument("--memory", type=parse_memory, help="memory limit, e.g. 2G")
    p.add_argument("--os", default=DEFAULT_OS, choices=sorted(OS_IMAGES), help=f"default {DEFAULT_OS}")
    p = sub.add_parser("down", help="stop nodes and remove everything they made")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("name", nargs="?")
    target.add_argument("--all", action="store_true", help="every node of this checkout")
    p = sub.add_parser("list", help="list the nodes on this host")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("ssh", help="ssh into a node as root, optionally running a command")
    p.add_argument("name")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = sub.add_parser("inventory", help="write the Ansible inventory of this checkout's nodes")
    p.add_argument("--output", type=Path, help="hosts.yml to write (default: $STATE/testnodes/inventory/)")
    p.add_argument("--group-vars", type=Path, help="link this directory as group_vars beside the inventory")
    sub.add_parser("gc", help="remove what killed runs left behind (live nodes are kept)")
    sub.add_parser("host-setup", help="install the host packages test nodes need (root)")
    p = sub.add_parser("_supervise")  # internal: the per-node supervisor
    p.add_argument("name")
    p.add_argument("memory_bytes", type=int, help="0: no limit")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.getsignal(signal.SIGTERM)
    if args.command != "_supervise":
        # Killed politely (CI timeouts, pytest-timeout): unwind, so an `up` half-way cleans after itself.
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _dispatch(args)
    except TestnodeError as exc:
        print(f"testnode: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a state directory this user may not write
        print(f"testnode: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "up":
        record = up(
            args.name,
            password_login=args.password_login,
            memory=args.memory,
            os_name=args.os,
            log=lambda msg: print(msg, file=sys.stderr),
        )
        print(record.address)
    elif args.command == "down":
        base = state_dir()
        if args.all:
            mine = [r for r in load_records() if r.state_dir == str(base)]
            for record in mine:
                down(record.name)
            if not mine:
                print(f"no nodes of {base}")
        else:
            down(args.name)
    elif args.command == "list":
        nodes = list_nodes(state_dir())
        if args.json:
            print(json.dumps(nodes, indent=2))
        else:
            print(f"{'NAME':<20} {'ADDRESS':<14} {'STATUS':<9} {'OS':<13} {'LOGIN':<9} STATE")
            for n in nodes:
                login = "password" if n["password_login"] else "key"
                print(
                    f"{n['name']:<20} {n['address']:<14} {n['status']:<9} {n['os']:<13} {login:<9} "
                    f"{'this checkout' if n['mine'] else n['state_dir']}"
                )
    elif args.command == "ssh":
        base = state_dir()
        record = find_own_node(args.name, base)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        # Interactive sessions may prompt (e.g. a passphrase); commands never should.
        os.execvp("ssh", [*ssh_base_args(base, record.address, batch=bool(cmd)), *cmd])
    elif args.command == "inventory":
        print(write_inventory(state_dir(), args.output, args.group_vars))
    elif args.command == "gc":
        gc()
    elif args.command == "host-setup":
        host_setup()
    elif args.command == "_supervise":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return supervise(args.name, argv, args.memory_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
