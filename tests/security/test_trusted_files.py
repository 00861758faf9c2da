"""Files root reads for policy or secrets must be root's alone (issue 11,
finding 7, and finding 1 for authmgr's files).

Attacks, each against the real programs started as root:

* a netperm-table that others may write (mode 0666), that another user owns,
  that sits in a directory others may write, or that is a link: every
  program refuses it with one `FILE: reason` line (smap under inetd: a 421
  to the client and nothing spooled), and `-n` says the same;
* `groupid 0` (or `groupid root`): refused by `-n` and at start-up, so no
  session ever runs with gid 0 (the review saw `Gid: 0` in a session's
  /proc status);
* an auth db whose directory uucp owns: authmgr and pop3-gw refuse it, and
  a `pop3-auth.lock` planted there as a link to a file of root's is never
  opened, chowned or written through.
"""

import os
import stat
import subprocess

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401
from tests.integration import realpeers
from tests.security.harness import SmapSetup, program

UUCP = 10


@pytest.fixture
def as_root():
    realpeers.require_root()


def run(argv, timeout=30):
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=timeout)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def assert_one_clear_line(text, expected):
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text
    assert any(expected in line for line in lines), text


def inetd_reply(setup):
    """The first reply an inetd-mode smap gives, and its exit status."""
    client = setup.inetd()
    code, text = client.reply()
    status = setup.wait_exit(client)
    return code, text, status


@pytest.fixture
def smap_setup(tmp_path, as_root):
    setup = SmapSetup(tmp_path / "smap")
    yield setup
    setup.stop()


def test_a_table_others_may_write_is_refused_by_every_program(smap_setup, tmp_path):
    table = smap_setup.table
    os.chmod(table, 0o666)
    code, text, status = inetd_reply(smap_setup)
    assert code == 421 and status != 0, text
    assert smap_setup.queued() == [] and not (smap_setup.spool / "queue").exists()
    for name in ("smap", "smapd", "pop3-gw", "authmgr"):
        status, out, err = run([program(name), "-c", str(table), "-n"])
        assert status == 1, (name, out, err)
        assert_one_clear_line(out + err, "%s: writable by group or others (mode 0666)" % table)
    status, out, err = run([program("smapd"), "-c", str(table), "--once"])
    assert status != 0
    assert_one_clear_line(err, "%s: writable by group or others" % table)


def test_a_table_owned_by_another_user_or_behind_a_link_is_refused(smap_setup, tmp_path):
    table = smap_setup.table
    os.chown(table, 65534, 65534)
    code, text, _ = inetd_reply(smap_setup)
    assert code == 421, text
    status, out, err = run([program("pop3-gw"), "-c", str(table), "--daemon",
                            "127.0.0.1:%d" % realpeers.free_port(), "-F"])
    assert status == 1
    assert_one_clear_line(err, "%s: owned by uid 65534, not by root" % table)
    os.chown(table, 0, 0)
    link = tmp_path / "table-link"
    link.symlink_to(table)
    status, out, err = run([program("smap"), "-c", str(link), "-n"])
    assert status == 1
    assert_one_clear_line(out + err, "%s: is a symbolic link" % link)
    # the same table by its real name is fine
    client = smap_setup.inetd()
    assert client.reply()[0] == 220
    assert client.cmd("QUIT")[0] == 221


def test_a_table_in_a_directory_uucp_may_write_is_refused(tmp_path, as_root):
    home = tmp_path / "uucp-home"
    home.mkdir()
    os.chown(home, UUCP, UUCP)
    setup = SmapSetup(home / "inside")
    try:
        os.chown(setup.table, 0, 0)
        code, text, _ = inetd_reply(setup)
        assert code == 421, text
        status, out, err = run([program("smap"), "-c", str(setup.table), "-n"])
        assert status == 1
        assert_one_clear_line(out + err, "%s: owned by uid %d, not by root" % (home, UUCP))
    finally:
        setup.stop()


def test_groupid_zero_never_reaches_a_session(smap_setup):
    table = smap_setup.table
    with open(table, "a") as out:
        out.write("smap: groupid 0\n")
    status, out, err = run([program("smap"), "-c", str(table), "-n"])
    assert status == 1
    assert_one_clear_line(out + err, "groupid: refusing '0': gid 0 is root's group")
    code, text, _ = inetd_reply(smap_setup)
    assert code == 421, text
    assert smap_setup.queued() == []


def test_groupid_root_by_name_is_refused_for_pop3_gw(tmp_path, as_root):
    table = tmp_path / "table"
    table.write_text("pop3-gw: groupid root\npop3-gw: server 127.0.0.1:1\n")
    status, out, err = run([program("pop3-gw"), "-c", str(table), "-n"])
    assert status == 1
    assert_one_clear_line(out + err, "groupid: refusing 'root': gid 0 is root's group")


def test_authmgr_refuses_an_auth_db_in_a_directory_uucp_owns(tmp_path, as_root):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    os.chown(shared, UUCP, UUCP)
    target = tmp_path / "root-only"
    target.write_text("root's own\n")
    os.chmod(target, 0o600)
    (shared / "pop3-auth.lock").symlink_to(target)
    table = tmp_path / "table"
    table.write_text("authmgr, pop3-gw: authfile %s\n" % (shared / "pop3-auth"))
    status, out, err = run([program("authmgr"), "-c", str(table), "adduser", "mallory"])
    assert status == 1
    assert_one_clear_line(err, "%s: owned by uid %d, not by root" % (shared, UUCP))
    info = os.stat(target)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)
    assert target.read_text() == "root's own\n"
    assert sorted(os.listdir(shared)) == ["pop3-auth.lock"]


def test_authmgr_never_opens_a_lock_planted_as_a_link(tmp_path, as_root):
    """A root-owned directory that another process's mistake left a link in:
    the lock is opened without following it, and the command fails."""
    home = tmp_path / "etc"
    home.mkdir(mode=0o700)
    target = tmp_path / "root-only"
    target.write_text("root's own\n")
    os.chmod(target, 0o600)
    (home / "pop3-auth.lock").symlink_to(target)
    table = tmp_path / "table"
    table.write_text("authmgr: authfile %s\n" % (home / "pop3-auth"))
    status, out, err = run([program("authmgr"), "-c", str(table), "adduser", "mallory"])
    assert status == 1
    assert_one_clear_line(err, "%s: is a symbolic link" % (home / "pop3-auth.lock"))
    assert target.read_text() == "root's own\n"
    assert not (home / "pop3-auth").exists()


def test_pop3_gw_refuses_logins_from_an_auth_db_uucp_could_replace(shared_dir, as_root):
    """The db's directory belongs to uucp: the file itself is root's and 0600,
    yet uucp could swap it, so pop3-gw uses none of it and never connects."""
    upstream = helpers.FakeServer(lambda conn, received: received.append(b"connected"))
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % upstream.port)
    database = setup.root / "db"
    database.mkdir(mode=0o755)
    os.rename(setup.authfile, database / "pop3-auth")
    setup.lines = [line.replace(str(setup.authfile), str(database / "pop3-auth"))
                   for line in setup.lines]
    setup.write_table()
    try:
        os.chown(database, UUCP, UUCP)
        with helpers.Daemon(setup) as daemon:
            client = helpers.Client(daemon.port)
            greeting = client.line()
            assert client.apop("alice", "alicesecret", greeting).startswith(b"-ERR [AUTH]")
            setup.log.wait_for(r"owned by uid %d, not by root" % UUCP, 10)
        assert upstream.received == []
    finally:
        setup.log.close()
        upstream.close()
