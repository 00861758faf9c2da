"""pop3-gw's decisions with real peers: `user%server` to a second Dovecot
only when asked and permitted, host rules by source address, destination
and user (with `!`), a source refused after maxbad, a changed auth db noticed without
a signal, and SIGHUP re-reading the table."""

import os
import poplib
import signal

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import close_clients, dovecot, shared_dir  # noqa: F401

pytestmark = pytest.mark.integration


def login(port, user="alice", secret="alicesecret", source="127.0.0.1"):
    """(first reply line after APOP, client)."""
    client = helpers.Client(port, source=source)
    greeting = client.line()
    if not greeting.startswith(b"+OK"):
        return greeting, client
    return client.apop(user, secret, greeting), client


def subjects(client):
    count = int(client.command(b"STAT").split()[1])
    found = []
    for number in range(1, count + 1):
        assert client.command(b"TOP %d 0" % number).startswith(b"+OK")
        found += [line for line in client.multiline() if line.startswith(b"Subject:")]
    client.command(b"QUIT")
    client.close()
    return found


@pytest.fixture
def second(shared_dir):
    """A second Dovecot on 127.0.0.2 with its own mail for alice."""
    with realpeers.Dovecot(shared_dir / "dovecot2", listen="127.0.0.2") as peer:
        peer.deliver("alice", b"Subject: on the second server\n\nsecond\n")
        yield peer


def test_percent_server_reaches_the_second_server_only_when_permitted(shared_dir, dovecot,
                                                                        second):
    dovecot.deliver("alice", b"Subject: on the first server\n\nfirst\n")
    setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % dovecot.port, rules=(
        "permit-hosts 127.0.0.1 -dest 127.0.0.2 -user alice",
        "permit-hosts 127.0.0.0/8"))
    try:
        with helpers.Daemon(setup) as daemon:
            reply, client = login(daemon.port)
            assert reply.startswith(b"+OK")
            assert subjects(client) == [b"Subject: on the first server"]
            reply, client = login(daemon.port, "alice%%127.0.0.2:%d" % second.port)
            assert reply.startswith(b"+OK")
            assert subjects(client) == [b"Subject: on the second server"]
            setup.log.wait_for(r"permit .*user=alice dest=127.0.0.2:%d rule=6" % second.port)  # table line 6
            # a destination no -dest rule names: refused, never contacted
            other = realpeers.free_port("127.0.0.3")
            reply, client = login(daemon.port, "alice%%127.0.0.3:%d" % other)
            assert reply.startswith(b"-ERR [SYS/PERM] permission denied")
            assert client.closed()
            setup.log.wait_for(r"deny .*user=alice dest=127.0.0.3:%d" % other)
            # the first server by name: no rule with -dest names it either
            reply, _ = login(daemon.port, "alice%%127.0.0.1:%d" % dovecot.port)
            assert reply.startswith(b"-ERR [SYS/PERM]")
            # the -dest rule is for source 127.0.0.1 only
            reply, _ = login(daemon.port, "alice%%127.0.0.2:%d" % second.port,
                             source="127.0.0.4")
            assert reply.startswith(b"-ERR [SYS/PERM]")
    finally:
        setup.log.close()
    assert "alice" in second.read_log()
    assert "127.0.0.3" not in second.read_log() + dovecot.read_log()


def test_rules_by_source_address_and_user(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port, rules=(
        "deny-hosts 127.0.0.3",
        "permit-hosts 127.0.0.2 127.0.0.4 -user !bob *",
        "permit-hosts 127.0.0.5 -dest localhost -user bob"),
        users={"alice": "alicesecret", "bob": "bobsecret"})
    try:
        with helpers.Daemon(setup) as daemon:
            greeting, client = login(daemon.port, source="127.0.0.3")
            assert greeting.startswith(b"-ERR [SYS/PERM] access denied")
            assert client.closed()
            setup.log.wait_for(r"deny host=\S+ addr=127.0.0.3")
            greeting, _ = login(daemon.port, source="127.0.0.6")        # no rule at all
            assert greeting.startswith(b"-ERR")
            reply, client = login(daemon.port, source="127.0.0.2")
            assert reply.startswith(b"+OK")
            client.close()
            reply, _ = login(daemon.port, "bob", "bobsecret", source="127.0.0.4")
            assert reply.startswith(b"-ERR [SYS/PERM]")                 # `!bob`
            reply, _ = login(daemon.port, "alice", source="127.0.0.5")
            assert reply.startswith(b"-ERR [SYS/PERM]")                 # -user bob only
            setup.log.wait_for(r"deny .*addr=127.0.0.5 user=alice")
    finally:
        setup.log.close()


def test_lockout_after_maxbad_persists_across_sessions(shared_dir, dovecot):
    """maxbad bad logins refuse their source (not the user) across sessions,
    until badsleep or `authmgr unblock`; the user's entry is never touched."""
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port,
                          extra=("pop3-gw: maxbad 3", "pop3-gw: badsleep 3600"))
    try:
        with helpers.Daemon(setup) as daemon:
            for attempt in range(3):                 # three sessions, one bad login each
                reply, client = login(daemon.port, secret="wrong")
                assert reply == b"-ERR [AUTH] Authentication failed"
                client.close()
            setup.log.wait_for(r"penalty addr=127.0.0.1 bad=3")
            reply, _ = login(daemon.port)            # the right secret, from that source
            assert reply == b"-ERR [AUTH] Authentication failed"
            setup.log.wait_for(r"auth-fail .*user=alice reason=\"source refused")
            assert (setup.user("alice").bad, setup.user("alice").locked_until) == (0, 0)
            reply, client = login(daemon.port, source="127.0.0.2")    # alice elsewhere
            assert reply.startswith(b"+OK")
            client.command(b"QUIT")
            # the administrator lifts the source's penalty; noticed without a signal
            result = helpers.run(helpers.AUTHMGR + ["-c", setup.table, "unblock", "127.0.0.1"])
            assert result.returncode == 0 and result.stdout == b"unblocked 127.0.0.1\n", result
            reply, client = login(daemon.port)
            assert reply.startswith(b"+OK")
            client.command(b"QUIT")
            assert setup.user("alice").last_login > 0
    finally:
        setup.log.close()


def test_auth_db_change_is_noticed_without_a_signal(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    try:
        with helpers.Daemon(setup) as daemon:
            reply, _ = login(daemon.port, secret="newsecret")
            assert reply.startswith(b"-ERR [AUTH]")
            result = helpers.run(helpers.AUTHMGR + ["-c", setup.table, "password", "--stdin",
                                                    "alice"], input=b"newsecret\n")
            assert result.returncode == 0, result.stderr
            # the gateway now wants the new secret; Dovecot still has the old
            # one and its own refusal comes through unchanged
            reply, _ = login(daemon.port, secret="newsecret")
            assert reply == b"-ERR [AUTH] Authentication failed."
            setup.log.wait_for(r"upstream-fail .*server rejected APOP")
            reply, _ = login(daemon.port)
            assert reply == b"-ERR [AUTH] Authentication failed"
    finally:
        setup.log.close()


def test_sighup_rereads_the_table(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    try:
        with helpers.Daemon(setup) as daemon:
            reply, client = login(daemon.port, source="127.0.0.7")
            assert reply.startswith(b"+OK")
            client.close()
            setup.lines.insert(0, "pop3-gw: deny-hosts 127.0.0.7")
            setup.write_table()
            reply, client = login(daemon.port, source="127.0.0.7")   # not yet
            assert reply.startswith(b"+OK")
            client.close()
            os.kill(daemon.proc.pid, signal.SIGHUP)
            setup.log.wait_for(r"reload users=1")
            greeting, _ = login(daemon.port, source="127.0.0.7")
            assert greeting.startswith(b"-ERR [SYS/PERM] access denied")
            reply, client = login(daemon.port, source="127.0.0.8")
            assert reply.startswith(b"+OK")
            client.close()
            # a broken table is refused on SIGHUP and the old one kept
            setup.lines.append("pop3-gw: timeout forever")
            setup.write_table()
            os.kill(daemon.proc.pid, signal.SIGHUP)
            setup.log.wait_for(r"reload reason=\"table has errors")
            reply, client = login(daemon.port, source="127.0.0.8")
            assert reply.startswith(b"+OK")
            client.close()
    finally:
        setup.log.close()


def test_poplib_sees_the_right_secret_and_the_gateway_pid_file(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    try:
        with helpers.Daemon(setup) as daemon:
            assert int(daemon.pidfile.read_text()) == daemon.proc.pid
            pop = poplib.POP3("127.0.0.1", daemon.port, timeout=30)
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                pop.apop("nosuch", "alicesecret")
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                pop.apop("alice", "wrong")
            pop.close()
            assert daemon.stop() == 0                  # SIGTERM: a clean stop
        setup.log.wait_for(r"pop3-gw\[\d+\]: stop ")
    finally:
        setup.log.close()


def test_user_pass_only_where_the_table_allows_it(shared_dir, dovecot):
    dovecot.deliver("alice", b"Subject: by USER/PASS\n\nbody\n")
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    try:
        with helpers.Daemon(setup) as daemon:
            pop = poplib.POP3("127.0.0.1", daemon.port, timeout=30)
            with pytest.raises(poplib.error_proto, match="USER/PASS not allowed"):
                pop.user("alice")
            pop.close()
        setup.lines.append("pop3-gw: userpass yes")
        setup.write_table()
        with helpers.Daemon(setup) as daemon:
            pop = poplib.POP3("127.0.0.1", daemon.port, timeout=30)
            assert "USER" in pop.capa()
            pop.user("alice")
            assert pop.pass_("alicesecret").startswith(b"+OK")      # APOP upstream
            assert b"Subject: by USER/PASS" in pop.retr(1)[1]
            pop.quit()
    finally:
        setup.log.close()


def test_detached_daemon_writes_its_pid_file_and_stops_on_sigterm(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port)
    pidfile = setup.root / "detached.pid"
    port = realpeers.free_port()
    try:
        result = helpers.run(helpers.POP3GW + ["-c", setup.table, "--daemon",
                                               "127.0.0.1:%d" % port, "--pidfile", pidfile])
        assert result.returncode == 0 and result.stderr == b""
        realpeers.wait_for_path(pidfile)
        realpeers.wait_for_listen("127.0.0.1", port)
        pid = int(pidfile.read_text().split()[0])
        try:
            pop = poplib.POP3("127.0.0.1", port, timeout=30)
            assert pop.apop("alice", "alicesecret").startswith(b"+OK")
            pop.quit()
        finally:
            os.kill(pid, signal.SIGTERM)
        realpeers.wait_until(lambda: not pidfile.exists(), 15, what="pid file removed")
        realpeers.wait_until(lambda: not realpeers.listening("127.0.0.1", port), 15,
                             what="listener closed")
        setup.log.wait_for(r"pop3-gw\[%d\]: stop " % pid)
    finally:
        setup.log.close()


def test_a_host_name_server_resolves_though_the_child_is_jailed(shared_dir, dovecot):
    # both the configured server and a %server are names: the jailed child
    # cannot read /etc/hosts, so this works only if the monitor resolves
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port, rules=(
        "permit-hosts 127.0.0.1 -dest localhost 127.0.0.1 *.invalid",
        "permit-hosts 127.0.0.1"))
    try:
        with helpers.Daemon(setup) as daemon:
            for name in ("alice", "alice%%localhost:%d" % dovecot.port):
                reply, client = login(daemon.port, name)
                assert reply.startswith(b"+OK"), reply
                assert client.command(b"STAT").startswith(b"+OK 0 ")
                client.command(b"QUIT")
            reply, _ = login(daemon.port, "alice%no-such-host.invalid")
            assert reply.startswith(b"-ERR [SYS/TEMP]")
            setup.log.wait_for(r"upstream-fail .*cannot resolve no-such-host.invalid")
            setup.log.wait_for(r"login .*user=alice dest=localhost:%d" % dovecot.port)
    finally:
        setup.log.close()
