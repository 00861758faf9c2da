"""Privilege audit of every live mailwall process, read from /proc.

All programs run at once, as root starts them in production:

* smap in inetd mode and smap --daemon, each with a session open (after
  the 220 banner);
* smapd -F with a delivery in progress (the recording MTA takes 3 s for a
  `slow…` recipient, so the scanner, the agent, the delivering worker and
  the MTA all exist at the same moment);
* pop3-gw --daemon with a client connected (the per-connection monitor and
  the jailed session child; and the pair forked ahead for the next
  connection, if it is there yet).

For each process /proc/PID/status gives the real, effective, saved and
file-system uid and gid and the supplementary groups, and /proc/PID/root
the root directory.  What DESIGN §1, §5, §7 and §8 require:

| process                 | uid/gid (all four)   | groups | root          |
|-------------------------|----------------------|--------|---------------|
| smap session (inetd and every --daemon worker) | uucp/uucp | none | the spool |
| smap --daemon worker's resolver helper | uucp/uucp | none | /  (needs /etc) |
| smapd scanner           | uucp/uucp            | none   | the spool     |
| smapd agent, worker, MTA| uucp/uucp            | none   | /  (must exec)|
| pop3-gw session child   | nobody/nogroup       | none   | its directory |
| pop3-gw daemon, monitor | root (by design: the root-only auth db)| / |

and the pop3-gw session child's memory holds no APOP secret (only the
monitor does).

No process but the two daemon parents holds a listening socket (TCP,
TCP6 or unix, from /proc/net): a session process, taken over, cannot
accept() another client's connection (issue 11, finding 5; the exact
descriptors each session process may hold are checked in
test_session_descriptors.py).

No smapd process and no process that reads a client's bytes has uid 0.
"""

import grp
import os
import pwd

import pytest

from tests.integration import pop3_helpers, realpeers
from tests.integration import smapd_helpers as helpers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401
from tests.security import descriptors
from tests.security.harness import SmapSetup

pytestmark = pytest.mark.integration


def ids(pid):
    """{'Uid': [r, e, s, fs], 'Gid': [...], 'Groups': [...]} as ints."""
    found = {}
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                found[key] = [int(v) for v in value.split()]
    return found


def root_of(pid):
    return os.readlink("/proc/%d/root" % pid)


def title_of(pid):
    return helpers.title_of(pid)


def memory_holds(pid, needle):
    """Whether any readable mapping of pid contains needle (/proc/PID/mem, as root)."""
    with open("/proc/%d/maps" % pid) as maps, open("/proc/%d/mem" % pid, "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in data:
                return True
    return False


def assert_cannot_accept(pid, listening):
    """pid holds none of the listening sockets.  A process forked this very
    moment (the next spare, the next standby) still has its parent's until
    its first step closes them: that is waited for, bounded; a process gone
    meanwhile holds nothing."""
    def holds():
        try:
            return descriptors.sockets_of(pid) & listening
        except FileNotFoundError:
            return set()
    try:
        realpeers.wait_until(lambda: not holds(), 5, what="no listening socket")
    except TimeoutError:
        raise AssertionError("%s (pid %d) holds listening socket(s) %s"
                             % (title_of(pid), pid, sorted(holds()))) from None


def assert_jailed(pid, uid, gid, root, what):
    found = ids(pid)
    assert found["Uid"] == [uid] * 4, (what, found)
    assert found["Gid"] == [gid] * 4, (what, found)
    assert found["Groups"] == [], (what, found)
    assert root_of(pid) == str(root), (what, root_of(pid))


def test_every_live_process_runs_as_the_design_says(tmp_path, shared_dir, rsyslog):
    realpeers.require_root()
    uucp = pwd.getpwnam("uucp")
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid
    audited = {}

    # -- smapd with a delivery in progress ------------------------------------
    directory = helpers.make_spool(tmp_path / "spool")
    recorder = helpers.recorder_dir(tmp_path / "mta")
    table = helpers.write_table(tmp_path / "table", directory,
                                sendmail=helpers.recording_sendmail(recorder),
                                logsocket=rsyslog.socket,
                                lines=["smapd: deliver-timeout 60"])
    smapd = helpers.Smapd(table, directory, tmp_path / "smapd.out")
    # -- smap with a session open on the same spool ------------------------------
    smap = SmapSetup(tmp_path / "smap")
    smap.table = table
    smap.spool = directory
    # -- pop3-gw with a client connected -----------------------------------------
    pop_setup = pop3_helpers.Setup(shared_dir / "gw", "127.0.0.1:9")
    pop_daemon = None
    try:
        pop_daemon = pop3_helpers.Daemon(pop_setup)
        client = smap.inetd()
        assert client.reply()[0] == 220
        smap_daemon, smap_port = smap.daemon()
        daemon_client = smap.connect(smap_port)
        assert daemon_client.reply()[0] == 220
        pop_client = pop3_helpers.Client(pop_daemon.port, timeout=20)
        pop_greeting = pop_client.line()
        assert pop_greeting.startswith(b"+OK")
        helpers.spool_message(directory, "a@example.net", ["slow@example.org"],
                              b"Subject: audit\r\n\r\nbody\r\n")
        os.kill(smapd.pid, 10)              # SIGUSR1: scan now

        def delivering():
            workers = [p for p in helpers.descendants_of(smapd.pid)
                       if title_of(p).startswith("smapd: delivering")]
            return workers and [p for p in helpers.descendants_of(workers[0])] and workers
        workers = realpeers.wait_until(delivering, 15, what="a delivery in progress")

        # -- the audit, all processes alive at once --------------------------------
        assert_jailed(client.proc.pid, uucp.pw_uid, uucp.pw_gid, directory, "smap session")
        audited["smap session"] = client.proc.pid
        # every --daemon worker, the one serving daemon_client and any idle
        # spare, is jailed; each has one resolver helper, unjailed but uucp
        daemon_children = helpers.children_of(smap_daemon.pid)
        busy = [p for p in daemon_children if title_of(p) == "smap: 127.0.0.1"]
        assert len(busy) == 1, [title_of(p) for p in daemon_children]
        for pid in daemon_children:
            assert_jailed(pid, uucp.pw_uid, uucp.pw_gid, directory,
                          "smap --daemon worker %s" % title_of(pid))
            resolvers = helpers.children_of(pid)
            assert [title_of(r) for r in resolvers] == ["smap: resolver"]
            assert_jailed(resolvers[0], uucp.pw_uid, uucp.pw_gid, "/", "smap resolver helper")
        audited["smap --daemon worker"] = busy[0]
        audited["smap resolver helper"] = helpers.children_of(busy[0])[0]
        assert_jailed(smapd.pid, uucp.pw_uid, uucp.pw_gid, directory, "smapd scanner")
        audited["smapd scanner"] = smapd.pid
        assert title_of(smapd.pid).startswith("smapd: scanner")
        agent = smapd.agent_pid()
        assert title_of(agent).startswith("smapd: agent")
        for pid in [agent] + helpers.descendants_of(agent):
            assert_jailed(pid, uucp.pw_uid, uucp.pw_gid, "/", "smapd %s" % title_of(pid))
            audited[title_of(pid)[:40]] = pid
        assert workers[0] in helpers.descendants_of(agent)
        for pid in [smapd.pid] + helpers.descendants_of(smapd.pid):
            assert 0 not in ids(pid)["Uid"], title_of(pid)
        def pop_roles():
            # the monitor renames itself just after the fork: wait for that
            # (the next session's pair, forked ahead, is titled "standby" until
            # it gets a connection; it is audited below when it is there)
            found = [p for p in pop3_helpers.session_children(pop_daemon.proc.pid)
                     if not title_of(p).startswith("pop3-gw: standby")]
            monitors = [p for p in found if title_of(p).startswith("pop3-gw: monitor")]
            sessions = [p for p in found if p not in monitors]
            return (sessions, monitors) if len(sessions) == len(monitors) == 1 else None
        sessions, monitors = realpeers.wait_until(pop_roles, 10, what="pop3-gw monitor and session")
        assert_jailed(sessions[0], nobody.pw_uid, nogroup, pop_setup.chroot, "pop3-gw session")
        audited["pop3-gw session"] = sessions[0]
        # Only the root monitor holds APOP secrets: the jailed child's memory
        # has its own banner's timestamp (the scan works) but no secret.
        assert memory_holds(sessions[0], pop_greeting.split()[-1])
        assert not memory_holds(sessions[0], b"alicesecret")
        for pid in pop3_helpers.session_children(pop_daemon.proc.pid):
            if title_of(pid).startswith("pop3-gw: standby"):
                if ids(pid)["Uid"] == [0] * 4:      # its monitor, not yet given a client
                    assert root_of(pid) == "/"
                else:
                    assert_jailed(pid, nobody.pw_uid, nogroup, pop_setup.chroot,
                                  "pop3-gw standby session")
        for pid in (pop_daemon.proc.pid, monitors[0]):
            assert root_of(pid) == "/"
            audited[title_of(pid)[:40]] = pid
        assert len(audited) >= 10, audited       # smap x3, scanner, agent, worker, MTA, pop3 x3
        # only the daemon parents listen; every other process, each session
        # process above included, holds no socket that accept() would take
        listening = descriptors.listening_sockets()
        for daemon_pid in (smap_daemon.pid, pop_daemon.proc.pid):
            assert descriptors.sockets_of(daemon_pid) & listening
        others = ([client.proc.pid, smapd.pid] + helpers.descendants_of(smapd.pid)
                  + helpers.descendants_of(smap_daemon.pid)
                  + pop3_helpers.session_children(pop_daemon.proc.pid))
        assert set(audited.values()) - {pop_daemon.proc.pid} <= set(others)
        for pid in others:
            assert_cannot_accept(pid, listening)
        client.cmd("QUIT")
        pop_client.command(b"QUIT")
        # the delivery ends as it should: the MTA got exactly one run
        realpeers.wait_until(lambda: helpers.recorded_runs(recorder), 20, what="MTA run")
    finally:
        smap.stop()
        smapd.stop()
        if pop_daemon is not None:
            pop_daemon.stop()
        pop_setup.log.close()
