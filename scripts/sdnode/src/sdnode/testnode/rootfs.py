"""The root filesystem cache (/var/cache/sdnode): a tarball per release and recipe, built once with
debootstrap, and the same unpacked beside it as the read-only lower layer of every node's overlay."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from sdnode.state import cache_dir
from sdnode.testnode.fileops import file_lock, mount_points_under, remove_tree
from sdnode.testnode.images import OS_IMAGES, OsImage
from sdnode.testnode.processes import Log, TestnodeError, run

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
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")
HOST_APT_CONF_DIR = Path("/etc/apt/apt.conf.d")
# Host apt settings worth mirroring into nodes: the proxy and the archive-validity relaxations it needs.
APT_SETTING_RE = re.compile(r"Acquire::(https?::Proxy|Check-Valid-Until|Check-Date)", re.IGNORECASE)
BUILD_STEPS_VERSION = 1  # bump when build_rootfs changes what it puts into the tarball
# Work in progress in the cache, renamed into place when complete; what a killed run leaves, gc removes.
BUILD_PREFIX, EXTRACT_PREFIX = ".build-", ".extract-"


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


def cache_lock_path() -> Path:
    """Held while the cache is written: one build or unpacking at a time."""
    return cache_dir() / ".rootfs.lock"


def rootfs_tarball(image: OsImage, recipe: dict[str, Any] | None = None) -> Path:
    return cache_dir() / f"rootfs-{image.suite}-{recipe_hash(recipe or rootfs_recipe(image))}.tar"


def ensure_rootfs_tarball(image: OsImage, log: Log = print) -> Path:
    """Build the cached root filesystem once (about a minute); concurrent callers wait for one build."""
    recipe = rootfs_recipe(image)
    tarball = rootfs_tarball(image, recipe)
    if tarball.exists():
        return tarball
    with file_lock(cache_lock_path()):
        if tarball.exists():  # built by another process while we waited
            return tarball
        log(f"building the {image.name} root filesystem (once; cached as {tarball}) ...")
        started = time.monotonic()
        # Built in a temp dir and renamed into place, so an interrupted build never leaves a bad cache.
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=BUILD_PREFIX) as tmp:
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


def base_tree(tarball: Path) -> Path:
    """The cached tarball unpacked once: the read-only lower layer that every node's overlay shares."""
    tree = tarball.with_suffix("")
    if tree.is_dir():
        return tree
    with file_lock(cache_lock_path()):
        if tree.is_dir():
            return tree
        # Unpacked beside it and renamed into place: a tree under that name is always complete.
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=EXTRACT_PREFIX))
        try:
            run(["tar", "-C", tmp, "--numeric-owner", "-xpf", tarball])
            os.chmod(tmp, 0o755)
            os.rename(tmp, tree)
        except BaseException:
            remove_tree(tmp)
            raise
    return tree


def gc_cache() -> list[str]:
    """Remove root filesystem builds a killed `up` left in the cache (debootstrap may leave /proc and
    /sys mounted inside) and trees of an older recipe, unless a build is running right now."""
    cache = cache_dir()
    if not cache.is_dir():
        return []
    builds = sorted([*cache.glob(f"{BUILD_PREFIX}*"), *cache.glob(f"{EXTRACT_PREFIX}*")])
    with open(cache_lock_path(), "a") as handle:
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
