"""The distribution releases a node can run (`testnode up --os`), and where debootstrap gets them."""

from __future__ import annotations

import dataclasses

DEFAULT_OS = "debian-12"  # a key of OS_IMAGES


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
