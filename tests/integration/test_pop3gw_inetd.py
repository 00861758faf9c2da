"""pop3-gw in inetd mode under the real xinetd, configured from the shipped
conf/xinetd.d/pop3-gw (only port, address and paths adapted): APOP through
to a real Dovecot, nothing of fd 2 reaching the client, and the session
child jailed."""

import os
import poplib
import re

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import (  # noqa: F401
    close_clients, dovecot, setup, shared_dir)

pytestmark = pytest.mark.integration

SHIPPED = helpers.ROOT / "conf" / "xinetd.d" / "pop3-gw"


def service_from_shipped(port, table):
    """The shipped entry with a test's port, address, program and table."""
    text = SHIPPED.read_text()
    body = re.search(r"^service\s+(\S+)\s*\{(.*?)^\}", text, re.M | re.S)
    assert body, "no service block in %s" % SHIPPED
    settings = []
    for line in body.group(2).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = line.split()[0]
        if key in ("server", "server_args"):
            continue
        settings.append(line)
    assert "user            = root" in text and "wait            = no" in text
    settings += ["type = UNLISTED", "port = %d" % port, "bind = 127.0.0.1",
                 "server = %s" % (helpers.ROOT / ".venv" / "bin" / "pop3-gw"),
                 "server_args = -c %s" % table]
    return "service pop3-gw-test\n{\n%s\n}\n" % "\n".join("\t" + s for s in settings)


def test_inetd_mode_under_real_xinetd(shared_dir, setup, dovecot):
    realpeers.require("xinetd")
    dovecot.deliver("alice", b"Subject: via xinetd\n\nhello\n")
    port = realpeers.free_port()
    with realpeers.Xinetd(shared_dir / "xinetd", service_from_shipped(port, setup.table)):
        pop = poplib.POP3("127.0.0.1", port, timeout=30)
        assert re.fullmatch(rb"\+OK mailwall pop3-gw ready <\d+\.\d+\.[0-9a-f]+\.pop3gw@[^>]+>",
                            pop.getwelcome())
        assert pop.apop("alice", "alicesecret").startswith(b"+OK")
        assert b"Subject: via xinetd" in pop.retr(1)[1]
        pop.quit()
        client = helpers.Client(port)
        first = client.line()
        assert client.command(b"HELO").startswith(b"-ERR unknown command")
        # a live session child under xinetd is jailed and unprivileged too
        pids = helpers.jailed_children(xinetd_pid(shared_dir))
        assert len(pids) == 1
        status = helpers.status_of(pids[0])
        assert status["Gid"].split() == ["65534"] * 4 and status["Groups"] == ""
        assert os.readlink("/proc/%d/root" % pids[0]) == str(setup.chroot)
        client.command(b"QUIT")
        assert first.startswith(b"+OK") and client.closed()
    setup.log.wait_for(r"login .*user=alice")
    setup.log.wait_for(r"disconnect reason=\"server closed\" .*user=alice")


def xinetd_pid(shared_dir):
    return int((shared_dir / "xinetd" / "xinetd.pid").read_text().split()[0])


def run_on_socketpair(argv):
    """Run argv with one end of a socketpair as fd 0, 1 and 2, exactly as
    inetd hands a connection; return what the client end received."""
    import socket
    import subprocess
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen([str(a) for a in argv], stdin=theirs, stdout=theirs,
                                stderr=theirs, cwd=str(helpers.ROOT))
        theirs.close()
        ours.settimeout(30)
        received = b""
        try:
            while True:
                try:
                    data = ours.recv(65536)
                except ConnectionResetError:    # it had ended before our QUIT arrived
                    break
                if not data:
                    break
                received += data
                if received.endswith(b"\r\n"):
                    try:
                        ours.sendall(b"QUIT\r\n")
                    except BrokenPipeError:
                        break
        finally:
            proc.wait(30)
    return proc.returncode, received


def test_inetd_mode_never_writes_to_stderr(shared_dir, setup):
    # a table with an error, a bad option: the client hears a temporary POP3
    # failure and nothing else (no message, no traceback on fd 2)
    refusal = b"-ERR [SYS/TEMP] service not available, try again later\r\n"
    broken = shared_dir / "broken-table"
    broken.write_text(setup.table.read_text() + "pop3-gw: timeout forever\n")
    code, received = run_on_socketpair(helpers.POP3GW + ["-c", broken])
    assert code == 1 and received == refusal
    code, received = run_on_socketpair(helpers.POP3GW + ["-c", setup.table, "--bogus"])
    assert code == 2 and received == refusal
    # not an IP socket: the host is "unknown" and only `*` lets it in
    code, received = run_on_socketpair(helpers.POP3GW + ["-c", setup.table])
    assert received == b"-ERR [SYS/PERM] access denied for this host\r\n"
    setup.log.wait_for(r"deny host=unknown addr=unknown")
    # the same socket with a table that permits it: a greeting and a clean QUIT
    setup.lines.append("pop3-gw: permit-hosts *")
    setup.write_table()
    code, received = run_on_socketpair(helpers.POP3GW + ["-c", setup.table])
    assert received.startswith(b"+OK mailwall pop3-gw ready <")
    assert received.endswith(b"+OK mailwall pop3-gw signing off\r\n") and code == 0
