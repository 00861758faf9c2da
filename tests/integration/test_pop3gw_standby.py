"""pop3-gw --daemon forks each session's pair ahead ("standby"): it serves
exactly one connection, counts against maxchildren, is replaced on SIGHUP,
retired when idle, replaced when it dies, and ends with the daemon."""

import os
import signal

import pytest

from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import standby_pair, title_of
from tests.integration.pop3_helpers import (  # noqa: F401  (fixtures)
    close_clients, dovecot, gateway, setup, shared_dir)

pytestmark = pytest.mark.integration


def no_standby(daemon_pid):
    return not any(title_of(pid).startswith(b"pop3-gw: standby")
                   for pid in helpers.session_children(daemon_pid))


def gone(pids):
    return not any(os.path.exists("/proc/%d" % pid) and title_of(pid) for pid in pids)


def logged_in(port, source="127.0.0.1"):
    client = helpers.Client(port, source=source, timeout=30)
    greeting = client.line()
    assert greeting.startswith(b"+OK"), greeting
    reply = client.apop("alice", "alicesecret", greeting)
    assert reply.startswith(b"+OK"), reply
    return client


def test_a_standby_serves_one_connection_and_the_next_is_forked(setup, gateway):
    daemon = gateway
    first = logged_in(daemon.port)
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10, what="standby")
    second = logged_in(daemon.port)
    # the standby became the second client's session, a fresh one waits
    monitor = standby[0]
    assert title_of(monitor).startswith(b"pop3-gw: monitor 127.0.0.1")
    assert title_of(standby[1]).startswith(b"pop3-gw: 127.0.0.1 alice")
    following = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10,
                                     what="the next standby")
    assert not set(following) & set(standby)
    for client in (first, second):
        assert client.command(b"STAT").startswith(b"+OK")
        assert client.command(b"QUIT").startswith(b"+OK")
    # a session's processes end with its client: never a second client
    realpeers.wait_until(lambda: gone(standby), 10, what="the session's processes gone")


def test_an_idle_standby_is_retired_and_the_next_client_still_served(setup, gateway):
    daemon = gateway
    logged_in(daemon.port).command(b"QUIT")
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10, what="standby")
    realpeers.wait_until(lambda: gone(standby), 15, what="the idle standby retired")
    assert no_standby(daemon.proc.pid)
    assert helpers.session_children(daemon.proc.pid) == []
    assert logged_in(daemon.port).command(b"QUIT").startswith(b"+OK")


def test_sighup_replaces_the_standby_so_the_new_table_applies(setup, gateway):
    daemon = gateway
    logged_in(daemon.port, source="127.0.0.7").command(b"QUIT")
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10, what="standby")
    setup.lines.insert(0, "pop3-gw: deny-hosts 127.0.0.7")
    setup.write_table()
    os.kill(daemon.proc.pid, signal.SIGHUP)
    setup.log.wait_for(r"reload users=1")
    realpeers.wait_until(lambda: gone(standby), 10, what="the old standby gone")
    client = helpers.Client(daemon.port, source="127.0.0.7")
    assert client.line().startswith(b"-ERR [SYS/PERM] access denied")
    assert logged_in(daemon.port, source="127.0.0.8").command(b"QUIT").startswith(b"+OK")


def test_a_standby_that_died_is_replaced(setup, gateway):
    daemon = gateway
    logged_in(daemon.port).command(b"QUIT")
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10, what="standby")
    os.kill(standby[0], signal.SIGKILL)         # the monitor; its child sees end of file
    realpeers.wait_until(lambda: gone(standby), 10, what="the killed standby gone")
    assert logged_in(daemon.port).command(b"QUIT").startswith(b"+OK")


def test_sigterm_ends_the_standby_with_the_daemon(setup, gateway):
    daemon = gateway
    logged_in(daemon.port).command(b"QUIT")
    standby = realpeers.wait_until(lambda: standby_pair(daemon.proc.pid), 10, what="standby")
    assert daemon.stop() == 0
    realpeers.wait_until(lambda: gone(standby), 10, what="the standby gone with the daemon")


def test_maxchildren_counts_the_standby(shared_dir, dovecot):
    setup = helpers.Setup(shared_dir / "gw", "localhost:%d" % dovecot.port,
                          extra=("pop3-gw: maxchildren 1",))
    try:
        with helpers.Daemon(setup) as daemon:
            first = logged_in(daemon.port)
            # the one allowed session is busy: no standby, the next is refused
            assert no_standby(daemon.proc.pid)
            refused = helpers.Client(daemon.port)
            assert refused.line().startswith(b"-ERR [SYS/TEMP] too busy")
            assert first.command(b"QUIT").startswith(b"+OK")
            realpeers.wait_until(lambda: helpers.session_children(daemon.proc.pid) == [],
                                 10, what="the session gone")
            assert logged_in(daemon.port).command(b"QUIT").startswith(b"+OK")
    finally:
        setup.log.close()
