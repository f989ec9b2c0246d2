"""The base role as deployed: admin users, sshd, updates, CAs and pip, hardening, firewall.

Expectations come from the inventory (host.ansible.get_variables()) or the role's defaults.
"""

from __future__ import annotations

import configparser
import hashlib
import ipaddress
import re
from pathlib import Path

import pytest

from .conftest import setting

ROLE = "base"
# Package names the driver stack uses on Debian and Ubuntu; unattended-upgrades must skip them all.
DRIVER_STACK_NAMES = [
    "nvidia-driver-cuda",
    "nvidia-kernel-dkms",
    "nvidia-kernel-open-dkms",
    "libnvidia-ml1",
    "libcuda1",
    "nvidia-persistenced",
    "cuda-drivers-570",
    "cuda-keyring",
    "nvidia-driver-570-server",
    "libnvidia-compute-570-server",
    "linux-modules-nvidia-570-server-generic",
    "nvidia-fabricmanager-570",
    "firmware-nvidia-gsp",
]


def base(node_vars: dict, name: str):
    return setting(node_vars, ROLE, name)


def resolved(host, node_vars: dict, name: str):
    """A variable as Ansible templates it for this host: inventory values and role defaults may be
    templates ("{{ query('fileglob', ...) }}", "{{ base_firewall_allowed_networks }}")."""
    value = base(node_vars, name)
    if isinstance(value, str) and "{{" in value:
        # Role defaults are not inventory variables: give the one other default templates refer to.
        extra = {"base_firewall_allowed_networks": base(node_vars, "base_firewall_allowed_networks")}
        value = host.ansible("debug", f"msg={value}", check=False, extra_vars=extra)["msg"]
    return value


@pytest.fixture(scope="module")
def sshd_config(host) -> dict[str, str]:
    """Effective sshd settings (`sshd -T`), keyword -> value."""
    with host.sudo():
        out = host.check_output("sshd -T")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.fixture(scope="module")
def admin_users(node_vars) -> list[dict]:
    return [u for u in base(node_vars, "base_admin_users") or [] if u.get("state", "present") == "present"]


# --- Admin users -------------------------------------------------------------------------------


def test_admin_users_exist_with_exactly_their_keys(host, admin_users) -> None:
    for user in admin_users:
        account = host.user(user["name"])
        assert account.exists, f"{user['name']} missing"
        assert account.shell == user.get("shell", "/bin/bash")
        home = host.file(account.home)
        assert home.mode == 0o750, f"{account.home} mode {oct(home.mode)}"
        with host.sudo():
            keys = host.file(f"{account.home}/.ssh/authorized_keys").content_string
        present = {" ".join(line.split()[:2]) for line in keys.splitlines() if line.strip()}
        wanted = {" ".join(k.split()[:2]) for k in user["ssh_keys"]}
        assert present == wanted, f"{user['name']}: authorized_keys differ"


def test_admin_users_have_passwordless_sudo(host, admin_users) -> None:
    with host.sudo():
        assert host.run("visudo -c").rc == 0
        for user in admin_users:
            rules = host.check_output(f"sudo -l -U {user['name']}")
            assert (user.get("sudo", True) and "NOPASSWD: ALL" in rules) or (
                not user.get("sudo", True) and "NOPASSWD" not in rules
            ), rules


# --- SSH server --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        ("passwordauthentication", "no"),
        ("kbdinteractiveauthentication", "no"),
        ("permitemptypasswords", "no"),
        ("pubkeyauthentication", "yes"),
        ("authenticationmethods", "publickey"),
        ("x11forwarding", "no"),
        ("permituserenvironment", "no"),
        ("hostbasedauthentication", "no"),
    ],
)
def test_sshd_fixed_settings(sshd_config, keyword, expected) -> None:
    assert sshd_config.get(keyword) == expected, f"{keyword} = {sshd_config.get(keyword)}"


def test_sshd_root_login_and_throttling_follow_the_inventory(sshd_config, node_vars) -> None:
    root = base(node_vars, "base_sshd_permit_root_login")
    # sshd -T spells prohibit-password as its old name.
    assert sshd_config["permitrootlogin"] == {"prohibit-password": "without-password"}.get(root, root)
    assert sshd_config["maxauthtries"] == str(base(node_vars, "base_sshd_max_auth_tries"))
    assert sshd_config["logingracetime"] == str(base(node_vars, "base_sshd_login_grace_time"))
    assert sshd_config["maxstartups"] == base(node_vars, "base_sshd_max_startups")


def test_sshd_offers_only_modern_algorithms_paramiko_can_use(sshd_config) -> None:
    kex = sshd_config["kexalgorithms"].split(",")
    ciphers = sshd_config["ciphers"].split(",")
    macs = sshd_config["macs"].split(",")
    hostkeys = sshd_config["hostkeyalgorithms"].split(",")
    # Fabric and testinfra speak Paramiko: these must stay.
    assert "curve25519-sha256@libssh.org" in kex
    assert "ssh-ed25519" in hostkeys
    assert any(c.startswith("aes") for c in ciphers)
    weak = re.compile(r"sha1|nistp|group1-|group14|cbc|3des|arcfour|md5|ssh-rsa$|ssh-dss|^umac-64")
    offenders = [a for a in kex + ciphers + macs + hostkeys if weak.search(a)]
    assert not offenders, offenders
    assert all(m.endswith("-etm@openssh.com") for m in macs), macs


def test_no_weak_host_keys(host) -> None:
    with host.sudo():
        for kind in ("dsa", "ecdsa"):
            assert not host.file(f"/etc/ssh/ssh_host_{kind}_key").exists, kind
        bits = int(host.check_output("ssh-keygen -l -f /etc/ssh/ssh_host_rsa_key.pub").split()[0])
    assert bits >= 3072, bits


def test_no_small_dh_moduli(host, node_vars) -> None:
    minimum = base(node_vars, "base_sshd_moduli_min_bits")
    small = host.check_output(f"awk '$1 !~ /^#/ && NF >= 7 && $5 < {minimum}' /etc/ssh/moduli")
    assert small == "", small.splitlines()[:3]


# --- Updates -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unattended_blacklist(host) -> list[str]:
    dump = host.check_output("apt-config dump Unattended-Upgrade::Package-Blacklist")
    return re.findall(r'^Unattended-Upgrade::Package-Blacklist:: "(.+)";$', dump, re.M)


@pytest.mark.parametrize("package", DRIVER_STACK_NAMES)
def test_unattended_upgrades_skip_the_driver_stack(unattended_blacklist, package) -> None:
    # unattended-upgrades applies each entry as re.match against the package name.
    assert any(re.match(p, package) for p in unattended_blacklist), (package, unattended_blacklist)


def test_unattended_upgrades_enabled_for_security_only(host) -> None:
    config = host.check_output("apt-config dump")
    assert 'APT::Periodic::Unattended-Upgrade "1";' in config
    origins = re.findall(r'^Unattended-Upgrade::Origins-Pattern:: "(.+)";$', config, re.M)
    assert origins and all("security" in o for o in origins), origins
    assert host.package("unattended-upgrades").is_installed


# --- CA certificates and pip --------------------------------------------------------------------


def test_extra_ca_certificates_are_trusted(host, node_vars) -> None:
    bundle = host.file("/etc/ssl/certs/ca-certificates.crt").content_string
    for item in resolved(host, node_vars, "base_extra_ca_certificates") or []:
        pem = (item if "-----BEGIN CERTIFICATE-----" in item else Path(item).read_text()).strip()
        name = f"/usr/local/share/ca-certificates/sdnode-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.crt"
        assert host.file(name).exists, name
        body = "".join(pem.splitlines()[1:-1])
        assert body[:64] in bundle.replace("\n", ""), f"{name} not in the system bundle"


def test_pip_uses_the_system_bundle_and_the_configured_index(host, node_vars) -> None:
    if not base(node_vars, "base_pip_conf_manage"):
        pytest.skip("base_pip_conf_manage is false on this node")
    parser = configparser.ConfigParser()
    parser.read_string(host.file("/etc/pip.conf").content_string)
    assert parser.get("global", "cert") == base(node_vars, "base_pip_cert")
    index = base(node_vars, "base_pip_index_url")
    assert parser.get("global", "index-url", fallback="") == index


# --- Hardening ----------------------------------------------------------------------------------


def test_unused_kernel_modules_cannot_load(host, node_vars) -> None:
    conf = host.file("/etc/modprobe.d/sdnode-hardening.conf").content_string
    for module in base(node_vars, "base_blacklisted_kernel_modules"):
        assert re.search(rf"^install {re.escape(module)} /bin/true$", conf, re.M), module


def test_core_dumps_are_off(host, node_vars) -> None:
    if not base(node_vars, "base_disable_core_dumps"):
        pytest.skip("base_disable_core_dumps is false on this node")
    assert "* hard core 0" in host.file("/etc/security/limits.d/90-sdnode-no-core.conf").content_string
    assert "Storage=none" in host.file("/etc/systemd/coredump.conf.d/90-sdnode.conf").content_string


def test_login_defs_defaults(host, node_vars) -> None:
    defs = host.file("/etc/login.defs").content_string
    for key, value in base(node_vars, "base_login_defs").items():
        assert re.search(rf"^{key}\s+{value}$", defs, re.M), key


def test_time_sync_runs_outside_containers(host, node_vars) -> None:
    if host.run("systemd-detect-virt --container").rc == 0:
        pytest.skip("a container: the host keeps time")
    daemon = {"timesyncd": "systemd-timesyncd", "chrony": "chrony"}.get(base(node_vars, "base_time_sync"))
    if daemon is None:
        pytest.skip("base_time_sync: none")
    assert host.service(daemon).is_running and host.service(daemon).is_enabled


# --- Firewall -----------------------------------------------------------------------------------


def nft_elements(networks: list[str], family: int) -> set[str]:
    """Networks as nft prints set elements: single addresses without a prefix length."""
    out = set()
    for n in networks:
        net = ipaddress.ip_network(n, strict=False)
        if net.version == family:
            out.add(str(net.network_address) if net.num_addresses == 1 else str(net))
    return out


def set_elements(host, name: str) -> set[str]:
    with host.sudo():
        text = host.check_output(f"nft list set inet sdnode_filter {name}")
    match = re.search(r"elements = \{([^}]*)\}", text, re.S)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def test_firewall_drops_input_by_default(host) -> None:
    with host.sudo():
        chain = host.check_output("nft list chain inet sdnode_filter input")
        assert host.run("nft -c -f /etc/nftables.conf").rc == 0
    assert "hook input priority filter; policy drop;" in chain, chain
    assert "ct state established,related accept" in chain
    assert host.service("nftables").is_enabled


def fleet_clients(request, node_vars: dict) -> list[str] | None:
    """Behind gateways, the addresses of the gateways and monitors (the only hosts the service ports
    admit), from the same inventory; None without gateways."""
    groups = node_vars.get("groups") or {}
    if not groups.get("sdgateways"):
        return None
    from testinfra.utils.ansible_runner import AnsibleRunner

    runner = AnsibleRunner(request.config.getoption("ansible_inventory"))
    names = sorted(set(groups["sdgateways"]) | set(groups.get("sdmonitor", [])))
    return sorted({str(runner.get_variables(n).get("ansible_host", n)) for n in names})


def test_firewall_admits_ssh_and_service_only_from_allowed_networks(host, node_vars, request) -> None:
    allowed = fleet_clients(request, node_vars) or resolved(host, node_vars, "base_firewall_allowed_networks")
    ssh_allowed = resolved(host, node_vars, "base_firewall_ssh_allowed_networks")
    assert ssh_allowed, "base_firewall_ssh_allowed_networks is empty: SSH would be closed to everyone"
    for family in (4, 6):
        assert set_elements(host, f"ssh_allowed_v{family}") == nft_elements(ssh_allowed, family)
        assert set_elements(host, f"service_allowed_v{family}") == nft_elements(allowed, family)
    with host.sudo():
        chain = host.check_output("nft list chain inet sdnode_filter input")
    port = base(node_vars, "base_sshd_port")
    assert f"tcp dport {port} ip saddr @ssh_allowed_v4 accept" in chain, chain
    assert re.search(r"tcp dport (\S+|\{ [^}]+ \}) ip saddr @service_allowed_v4 accept", chain), chain
    # Nothing else is accepted from anywhere: every accept rule on a TCP port names an allowed set, or
    # (a fleet's exporter ports) the monitors' addresses.
    monitors = fleet_clients(request, node_vars) or []
    open_to_all = [
        line.strip()
        for line in chain.splitlines()
        if "tcp dport" in line
        and "accept" in line
        and "@ssh_allowed" not in line
        and "@service_allowed" not in line
        and not (
            monitors
            and re.search(r"ip6? saddr (\{ )?[0-9a-f.:, ]+( \})? accept comment", line)
            and all(a in monitors for a in re.findall(r"[0-9]+(?:\.[0-9]+){3}", line.split("saddr")[1]))
        )
    ]
    assert open_to_all == base(node_vars, "base_firewall_extra_input_rules"), open_to_all


def test_service_ports_are_open_in_the_firewall(host, node_vars) -> None:
    with host.sudo():
        chain = host.check_output("nft list chain inet sdnode_filter input")
    ports = node_vars.get("sdnode_service_ports")
    base_port = int(node_vars.get("sd_service_port_base", 7860))
    if ports is None:
        # The instances' range, and the same shifted for their HAProxy agents.
        count = base(node_vars, "base_firewall_service_port_count")
        shift = int(node_vars.get("sdnode_agent_port_offset", 100))
        last = base_port + count - 1
        expected = f"{base_port}-{last}, {base_port + shift}-{last + shift}"
    else:
        expected = ", ".join(str(p) for p in ports)
    assert re.search(rf"tcp dport \{{? ?{re.escape(expected)} ?\}}? ip saddr @service_allowed_v4", chain), (
        chain
    )
