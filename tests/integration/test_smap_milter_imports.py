"""smap's inetd path imports `socket` only when milters are configured (issue 15).

Under inetd every connection is a fresh interpreter measured against a
bare one; the milter client needs `socket`, `select` and `struct`, so
they must come only with `smap: milters`.  A child interpreter runs
smap.main.main as inetd would (the client on fd 0/1) and reports, after
the session, whether `socket` and smap.milter were imported.
"""

import os
import socket
import subprocess
import sys

from tests.integration import realpeers
from tests.security.hostile_milter import HostileMilter

CHILD = """import os, sys
from smap import main
main.main(['-c', %r])
os.write(%d, b'%%d %%d' %% ('socket' in sys.modules, 'smap.milter' in sys.modules))
"""


def imports_after_one_session(tmp_path, *lines):
    realpeers.open_up(tmp_path)
    table = tmp_path / "table"
    table.write_text("smap: directory %s/spool\nsmap: logsocket %s/nolog\n%s\n"
                     % (tmp_path, tmp_path, "\n".join(lines)))
    ours, theirs = socket.socketpair()
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", CHILD % (str(table), write_end)],
                            stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL,
                            pass_fds=(write_end,), env=env, close_fds=True)
    theirs.close()
    os.close(write_end)
    try:
        ours.settimeout(20)
        assert ours.recv(100).startswith(b"220 ")
        ours.sendall(b"QUIT\r\n")
        assert ours.recv(100).startswith(b"221 ")
        assert proc.wait(20) == 0
        return os.read(read_end, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(read_end)
        ours.close()


def test_no_milter_no_socket_import(tmp_path):
    assert imports_after_one_session(tmp_path) == b"0 0"


def test_a_milter_brings_its_imports(tmp_path):
    with HostileMilter() as milter:
        assert imports_after_one_session(tmp_path, "smap: milters %s" % milter.spec) == b"1 1"
