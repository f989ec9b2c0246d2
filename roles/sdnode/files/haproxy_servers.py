"""The servers of a gateway's backend sdserve as JSON, from HAProxy's admin socket (`show stat`):
{"<host>_<index>": {"status": "UP", "scur": 0, "qcur": 0}, ...}. Run on a gateway by sd_gateway (wait
until the fleet is up) and by roles/sdnode/tasks/rotation.yml (wait until a drained server is idle)."""

import csv
import json
import socket
import sys

sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1] if len(sys.argv) > 1 else "/run/haproxy/admin.sock")
sock.sendall(b"show stat\n")
data = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
servers = {
    row["svname"]: {"status": row["status"], "scur": int(row["scur"] or 0), "qcur": int(row["qcur"] or 0)}
    for row in csv.DictReader(data.lstrip("# ").splitlines())
    if row["pxname"] == "sdserve" and row["svname"] not in ("FRONTEND", "BACKEND")
}
print(json.dumps(servers))
