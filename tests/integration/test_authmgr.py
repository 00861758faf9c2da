"""authmgr, run as the administrator runs it: every command, the two prompts
on a real terminal (a pty) with "Verify", a mismatch changing nothing, the
0600 file, and concurrent runs losing nothing."""

import os
import pty
import select
import stat
import time
from pathlib import Path

import pytest

from common import authdb
from tests.integration import pop3_helpers as helpers

pytestmark = pytest.mark.integration


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "netperm-table"
    path.write_text("authmgr, pop3-gw: authfile %s\n" % (tmp_path / "pop3-auth"))
    return path


def authmgr(table, *args, stdin=None):
    result = helpers.run(helpers.AUTHMGR + ["-c", table] + list(args),
                         input=stdin.encode() if stdin is not None else None)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def on_terminal(table, args, answers, timeout=30):
    """Run authmgr on a pty, answering each prompt in turn; (status, transcript)."""
    pid, fd = pty.fork()
    if pid == 0:                                            # the child: exec authmgr
        try:
            os.chdir(str(helpers.ROOT))
            os.execv(helpers.PYTHON, helpers.AUTHMGR + ["-c", str(table)] + list(args))
        finally:
            os._exit(127)
    transcript, pending = b"", list(answers)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:                                 # EIO: the child is gone
                break
            if not data:
                break
            transcript += data
            prompts = transcript.count(b"password: ") + transcript.count(b"Verify: ")
            # answer each prompt once it is shown (getpass flushes earlier input)
            if pending and prompts > len(answers) - len(pending) \
                    and transcript.endswith(b": "):
                os.write(fd, pending.pop(0).encode() + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), transcript.decode("utf-8", "replace")


def test_every_command(table, tmp_path):
    authfile = tmp_path / "pop3-auth"
    assert authmgr(table, "adduser", "alice", "Alice Liddell")[0] == 0
    assert stat.S_IMODE(os.stat(authfile).st_mode) == 0o600
    code, out, _ = authmgr(table, "list")
    assert code == 0 and "alice" in out and "no-password" in out
    assert authmgr(table, "password", "--stdin", "alice", stdin="s3cret pass\n")[0] == 0
    assert authdb.load(str(authfile))[0]["alice"].secret == "s3cret pass"
    code, out, _ = authmgr(table, "display", "alice")
    assert code == 0 and "name: Alice Liddell" in out and "password: set" in out
    assert "s3cret" not in out                          # the secret is never shown
    assert authmgr(table, "disable", "alice")[0] == 0
    assert not authdb.load(str(authfile))[0]["alice"].enabled
    assert "disabled" in authmgr(table, "list")[1]
    assert authmgr(table, "enable", "alice")[0] == 0
    assert authdb.load(str(authfile))[0]["alice"].enabled
    code, _, err = authmgr(table, "adduser", "alice")
    assert code == 1 and "exists" in err
    code, _, err = authmgr(table, "adduser", "bad name;rm")
    assert code == 1 and "bad user name" in err
    code, _, err = authmgr(table, "enable", "nosuch")
    assert code == 1 and "no such user" in err
    code, _, err = authmgr(table, "frobnicate")
    assert code == 2 and "usage" in err
    assert authmgr(table, "deluser", "alice")[0] == 0
    assert authdb.load(str(authfile))[0] == {}


def test_password_asks_twice_and_a_mismatch_changes_nothing(table, tmp_path):
    authfile = str(tmp_path / "pop3-auth")
    authmgr(table, "adduser", "bob")
    authmgr(table, "password", "--stdin", "bob", stdin="original\n")
    before = Path(authfile).read_text()
    code, transcript = on_terminal(table, ["password", "bob"], ["first", "second"])
    assert code == 1 and "Verify:" in transcript and "do not match" in transcript
    assert Path(authfile).read_text() == before
    assert "first" not in transcript                        # no echo of the secret
    code, transcript = on_terminal(table, ["password", "bob"], ["newone", "newone"])
    assert code == 0 and "password set for bob" in transcript
    assert authdb.load(authfile)[0]["bob"].secret == "newone"


def test_empty_or_control_character_passwords_are_refused(table, tmp_path):
    authmgr(table, "adduser", "carol")
    assert authmgr(table, "password", "--stdin", "carol", stdin="\n")[0] == 1
    assert authmgr(table, "password", "--stdin", "carol", stdin="a\x01b\n")[0] == 1
    assert authdb.load(str(tmp_path / "pop3-auth"))[0]["carol"].secret == ""


def test_concurrent_authmgr_runs_lose_nothing(table, tmp_path):
    import subprocess
    procs = [subprocess.Popen(helpers.AUTHMGR + ["-c", str(table), "adduser", "user%d" % i],
                              cwd=str(helpers.ROOT), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(12)]
    assert [p.wait(60) for p in procs] == [0] * 12
    users, _ = authdb.load(str(tmp_path / "pop3-auth"))
    assert sorted(users) == sorted("user%d" % i for i in range(12))


def test_an_unsafe_file_is_refused(table, tmp_path):
    authmgr(table, "adduser", "dave")
    os.chmod(tmp_path / "pop3-auth", 0o644)
    code, _, err = authmgr(table, "list")
    assert code == 1 and "0600" in err
