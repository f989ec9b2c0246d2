"""A node's root filesystem: its overlay on the cached tree, its own identity (host keys, machine-id,
hostname, root's key), its mounts, and moving it to the trash when the node goes."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import subprocess
from pathlib import Path

from sdnode.testnode.checkout import key_path
from sdnode.testnode.fileops import RM_TREE, mount_points_under, remove_tree
from sdnode.testnode.processes import TestnodeError, all_pids, proc_cmdline, run
from sdnode.testnode.records import node_dir, nodes_dir
from sdnode.testnode.rootfs import base_tree


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


def trash_dir() -> Path:
    return nodes_dir() / ".trash"


def trash_being_deleted() -> set[Path]:
    """Trash entries a background `rm` (started by discard_tree) is deleting right now."""
    busy = set()
    for pid in all_pids():
        argv = proc_cmdline(pid)
        if tuple(argv[:-1]) == RM_TREE and len(argv) == len(RM_TREE) + 1:
            path = Path(argv[-1])
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
        [*RM_TREE, str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
