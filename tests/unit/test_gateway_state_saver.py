"""roles/sd_gateway/files/haproxy_save_state.py: what it keeps of a gateway's server states for the
next HAProxy process, against a unix socket answering `show servers state` as HAProxy 2.6 does.
(End to end, a drain through a reload and a restart: tests/integration/test_fleet.py.)"""

import importlib.util
import socketserver
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("saver", ROOT / "roles/sd_gateway/files/haproxy_save_state.py")
saver = importlib.util.module_from_spec(spec)
spec.loader.exec_module(saver)

HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state "
    "srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port "
    "srv_check_addr srv_agent_addr srv_agent_port"
)
# As Debian 12's HAProxy 2.6.12 writes it for the demo fleet, with fleet1_0 drained by an operator
# (admin state 8: forced drain).
DUMP = f"""1
{HEADER}
3 sdserve 1 fleet1_0 10.213.0.11 2 8 1 1 40 15 3 3 6 22 0 0 - 7860 - 0 0 - - 7960
3 sdserve 2 fleet2_0 10.213.0.12 2 0 1 1 81 15 3 3 6 22 0 0 - 7860 - 0 0 - - 7960

"""
CONFIG = """global
\tstats socket /run/haproxy/admin.sock mode 660 level admin
frontend https
\tbind :443 ssl crt /etc/haproxy/certs/gateway.pem
backend sdserve
\tdefault-server check inter 1000ms observe layer4
\tserver fleet1_0 10.213.0.11:7860 maxconn 8 agent-check agent-port 7960
\tserver fleet2_0 10.213.0.12:7860 maxconn 8 agent-check agent-port 7960

frontend metrics
\tbind :8405
"""


def lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()[1:]]


def test_reads_the_configured_servers_of_each_backend_only():
    assert saver.configured(CONFIG) == {
        ("sdserve", "fleet1_0"): ("10.213.0.11", "7860"),
        ("sdserve", "fleet2_0"): ("10.213.0.12", "7860"),
    }
    assert saver.configured("backend b\n\tserver s6 [fd00::1]:7861 check\n") == {
        ("b", "s6"): ("fd00::1", "7861")
    }


def test_keeps_the_states_cut_to_the_mandatory_fields():
    kept = saver.kept(DUMP, saver.configured(CONFIG))
    assert kept.splitlines()[0] == "1"
    assert [(f[3], f[6]) for f in lines(kept)] == [("fleet1_0", "8"), ("fleet2_0", "0")]
    # Without the ssl, check and agent addresses and ports: the configuration's win.
    assert {len(f) for f in lines(kept)} == {20}


def test_drops_a_server_whose_address_or_port_changed_or_that_is_gone():
    # HAProxy would apply the old port over the new configuration's: the new one is not restored.
    moved = CONFIG.replace("10.213.0.11:7860", "10.213.0.11:7870").replace(
        "\tserver fleet2_0", "\t#server fleet2_0"
    )
    assert saver.kept(DUMP, saver.configured(moved)) == "1\n"
    readdressed = CONFIG.replace("10.213.0.12:7860", "10.213.0.99:7860")
    assert [f[3] for f in lines(saver.kept(DUMP, saver.configured(readdressed)))] == ["fleet1_0"]


def test_writes_nothing_it_does_not_understand():
    assert saver.kept("2\n3 sdserve 1 fleet1_0 10.213.0.11 2 8\n", saver.configured(CONFIG)) == ""
    assert saver.kept("Permission denied\n", saver.configured(CONFIG)) == ""


def test_saves_from_the_admin_socket_and_replaces_the_file_whole(tmp_path):
    asked = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            asked.append(self.rfile.readline().decode())
            self.wfile.write(DUMP.encode())

    sock = tmp_path / "admin.sock"
    server = socketserver.ThreadingUnixStreamServer(str(sock), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config, state = tmp_path / "haproxy.cfg", tmp_path / "server-state"
    config.write_text(CONFIG)
    state.write_text("1\nan old state\n")
    try:
        saver.main(str(sock), str(config), str(state))
    finally:
        server.shutdown()
    assert asked == ["show servers state\n"]
    assert [f[3] for f in lines(state.read_text())] == ["fleet1_0", "fleet2_0"]
    assert not (tmp_path / "server-state.new").exists()


def test_a_failed_save_leaves_no_older_states(tmp_path):
    # An older save may re-drain a server undrained since, with ports checked against an older config.
    state = tmp_path / "server-state"
    state.write_text("1\n3 sdserve 1 fleet1_0 10.213.0.11 2 8 1 1 40 15 3 3 6 22 0 0 - 7860 -\n")
    (tmp_path / "haproxy.cfg").write_text(CONFIG)
    with pytest.raises(OSError):
        saver.main(str(tmp_path / "no.sock"), str(tmp_path / "haproxy.cfg"), str(state))
    assert not state.exists()
