#!/usr/bin/env python3
"""Build stand-in NVIDIA packages with equivs and publish them as a signed flat apt repository.

    build_repo.py --pool DIR --repo DIR [--driver 570.100.01 ...] [--distro debian12]

The pool (built .debs and the signing key) is reused while packages.yml is unchanged; publishing picks
the driver versions to offer (all when --driver is not given), so a test can add a newer version later
and exercise the upgrade path. The stand-in cuda-keyring carries this repository's public key at the
path the real one uses, so the role's Signed-By trust is exercised for real, and a sources list pointing
at NVIDIA (which the role must divert away, or apt update fails here). The DCGM stand-ins (packages.yml
`dcgm`) carry small scripts and units from dcgm/ under the real paths; the exporter's script gets the
"<dcgm>-<exporter>" release it is paired with.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFINITIONS = HERE / "packages.yml"
KEY_UID = "sdnode stand-in repository <standin@sdnode.invalid>"

UNIT = """[Unit]
Description=Stand-in for {name} (sdnode tests; does nothing)

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
"""


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def ensure_tools() -> None:
    missing = [t for t in ("equivs-build", "apt-ftparchive", "gpg") if shutil.which(t) is None]
    if missing:
        # Controller-side test tools from Debian's archive.
        run(
            ["apt-get", "install", "-y", "-q", "equivs", "apt-utils", "gnupg"],
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )


def upstream(version: str) -> str:
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def specs(distro: str) -> list[dict]:
    """Every (package, version) to build, with its control fields and files."""
    data = yaml.safe_load(DEFINITIONS.read_text())
    out = []
    for family in ("debian", "ubuntu"):
        for version in data["driver_versions"][family]:
            branch = upstream(version).split(".")[0]
            for name, spec in data[family].items():

                def fill(text: str, version: str = version, branch: str = branch) -> str:
                    return text.replace("{V}", version).replace("{B}", branch)

                out.append(
                    {
                        "name": fill(name),
                        "version": version,
                        "driver": upstream(version),
                        "depends": [fill(d) for d in spec.get("depends", [])],
                        "unit": spec.get("unit"),
                        "keyring": False,
                        "files": {},
                    }
                )
    dcgm = data["dcgm"]
    for version in dcgm["versions"]:
        for name, spec in dcgm["packages"].items():
            out.append(
                {
                    "name": name,
                    "version": version,
                    "driver": None,
                    "depends": [d.replace("{V}", version) for d in spec.get("depends", [])],
                    "unit": None,
                    "keyring": False,
                    "files": spec.get("files", {}),
                }
            )
    exporter = dcgm["exporter"]
    for version, paired in exporter["versions"].items():
        out.append(
            {
                "name": exporter["name"],
                "version": version,
                "driver": None,
                "depends": exporter["depends"],
                "unit": None,
                "keyring": False,
                "files": exporter["files"],
                "build_version": f"{paired}-{upstream(version)}",
            }
        )
    for name, spec in data["others"].items():
        for version in spec["versions"]:
            out.append(
                {
                    "name": name,
                    "version": version,
                    "driver": None,
                    "depends": [],
                    "unit": None,
                    "keyring": bool(spec.get("keyring")),
                    "files": {},
                }
            )
    return out


def signing_key(pool: Path) -> Path:
    """A throwaway signing key kept with the pool; returns GNUPGHOME."""
    home = pool / "gnupg"
    if not (home / "pubkey.gpg").exists():
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True, mode=0o700)
        env = dict(os.environ, GNUPGHOME=str(home))
        run(
            ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", KEY_UID, "ed25519", "sign", "never"],
            env=env,
        )
        exported = subprocess.run(
            ["gpg", "--export", KEY_UID], env=env, check=True, capture_output=True
        ).stdout
        assert exported, "gpg exported no key"
        (home / "pubkey.gpg").write_bytes(exported)
    return home


def build_one(spec: dict, pool: Path, distro: str, pubkey: Path) -> Path:
    # As Debian names files: without the version's epoch.
    deb = pool / f"{spec['name']}_{spec['version'].split(':', 1)[-1]}_all.deb"
    if deb.exists():
        return deb
    with tempfile.TemporaryDirectory(prefix="equivs-") as tmp:
        work = Path(tmp)
        lines = [
            "Section: misc",
            "Priority: optional",
            "Standards-Version: 4.6.2",
            f"Package: {spec['name']}",
            f"Version: {spec['version']}",
            "Maintainer: sdnode tests <tests@sdnode.invalid>",
            "Architecture: all",
        ]
        if spec["depends"]:
            lines.append("Depends: " + ", ".join(spec["depends"]))
        files = []
        if spec["unit"]:
            unit = work / f"{spec['unit']}.service"
            unit.write_text(UNIT.format(name=spec["unit"]))
            files.append(f"{unit.name} /lib/systemd/system/")
        for source, dest in spec["files"].items():
            staged = work / Path(source).name
            text = (HERE / source).read_text().replace("@BUILD_VERSION@", spec.get("build_version", ""))
            staged.write_text(text)
            staged.chmod((HERE / source).stat().st_mode & 0o777)
            files.append(f"{staged.name} {dest}")
        if spec["keyring"]:
            shutil.copy(pubkey, work / "cuda-archive-keyring.gpg")
            listing = work / f"cuda-{distro}-x86_64.list"
            # What the real keyring ships: a source pointing at NVIDIA, unreachable from the test nodes.
            listing.write_text(
                "deb [signed-by=/usr/share/keyrings/cuda-archive-keyring.gpg] "
                f"https://developer.download.nvidia.com/compute/cuda/repos/{distro}/x86_64/ /\n"
            )
            files += [
                "cuda-archive-keyring.gpg /usr/share/keyrings/",
                f"{listing.name} /etc/apt/sources.list.d/",
            ]
        if files:
            lines.append("Files: " + "\n ".join(files))
        lines += [
            f"Description: stand-in for {spec['name']} (sdnode tests)",
            " Stand-in scripts under the real names (no GPU, no DCGM), for sd_monitor's DCGM test."
            if spec["files"]
            else " Empty package under the real name, for the nvidia_driver role's integration test.",
        ]
        (work / "control").write_text("\n".join(lines) + "\n")
        run(["equivs-build", "control"], cwd=work)
        built = next(work.glob("*.deb"))
        shutil.move(built, deb)
    return deb


def build_pool(pool: Path, distro: str) -> list[dict]:
    ensure_tools()
    pool.mkdir(parents=True, exist_ok=True)
    contents = b"".join(f.read_bytes() for f in sorted((HERE / "dcgm").iterdir()))
    stamp = hashlib.sha256(
        DEFINITIONS.read_bytes() + Path(__file__).read_bytes() + contents + distro.encode()
    ).hexdigest()
    marker = pool / "definitions.sha256"
    if not marker.exists() or marker.read_text() != stamp:
        for old in pool.glob("*.deb"):
            old.unlink()
        shutil.rmtree(pool / "gnupg", ignore_errors=True)
    home = signing_key(pool)
    all_specs = specs(distro)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        debs = list(ex.map(lambda s: build_one(s, pool, distro, home / "pubkey.gpg"), all_specs))
    for spec, deb in zip(all_specs, debs, strict=True):
        spec["deb"] = str(deb)
    marker.write_text(stamp)
    return all_specs


def publish(pool: Path, repo: Path, distro: str, drivers: list[str] | None) -> dict:
    """(Re)publish the repository with the chosen driver versions; returns what it holds."""
    all_specs = build_pool(pool, distro)
    home = pool / "gnupg"
    env = dict(os.environ, GNUPGHOME=str(home))
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    chosen = [s for s in all_specs if s["driver"] is None or drivers is None or s["driver"] in drivers]
    for spec in chosen:
        shutil.copy(spec["deb"], repo)
    packages = run(["apt-ftparchive", "packages", "."], cwd=repo).stdout
    (repo / "Packages").write_text(packages)
    with gzip.open(repo / "Packages.gz", "wt") as fh:
        fh.write(packages)
    release = run(
        [
            "apt-ftparchive",
            "-o",
            "APT::FTPArchive::Release::Origin=sdnode-standin",
            "-o",
            "APT::FTPArchive::Release::Label=sdnode-standin",
            "release",
            ".",
        ],
        cwd=repo,
    ).stdout
    (repo / "Release").write_text(release)
    run(["gpg", "--batch", "--yes", "--clearsign", "-o", "InRelease", "Release"], cwd=repo, env=env)
    run(["gpg", "--batch", "--yes", "-abs", "-o", "Release.gpg", "Release"], cwd=repo, env=env)
    return {"repo": str(repo), "packages": sorted(f"{s['name']}={s['version']}" for s in chosen)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pool", type=Path, required=True, help="where built .debs and the signing key are kept"
    )
    parser.add_argument("--repo", type=Path, required=True, help="repository directory to (re)publish")
    parser.add_argument("--driver", action="append", help="driver upstream version to offer (repeatable)")
    parser.add_argument(
        "--distro", default="debian12", help="NVIDIA's name for the node OS (debian12, ubuntu2204)"
    )
    args = parser.parse_args()
    print(json.dumps(publish(args.pool, args.repo, args.distro, args.driver), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
