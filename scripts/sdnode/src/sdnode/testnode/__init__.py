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

Modules, each importing only those above it: processes, fileops, names, images, records, checkout,
rootfs, network, noderoot, supervisor, hostsetup, inventory, lifecycle, gc, cli (`testnode` is cli.main).
"""
