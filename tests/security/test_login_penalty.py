"""Bad logins against the real pop3-gw daemon and a real Dovecot: the
penalty is keyed on the source address, never on the user (issue 11,
finding 6).

The attacks and what must happen:

* an attacker on 127.0.0.2 fails for john `maxbad` times and more: john
  from his own address 127.0.0.3 still logs in, at Dovecot, and fetches his
  message (the old per-user lock let anyone lock him out indefinitely);
* the attacker's source, past `maxbad` failures, is refused even with the
  right digest, for john and for any other user, while other sources are not;
* a wrong digest for an existing user and any digest for an unknown user do
  the same work: the auth db is left byte-identical and unrewritten (same
  inode, same mtime), and the penalty state of each source changes alike
  (no per-user write that would make the existing name's answer slower);
* a good login does not reset its source's count (an attacker's own
  account must not buy it more guesses at someone else's).

No timing is asserted (house rule): equal timing follows from equal work.
"""

import os

import pytest

from common import apop
from pop3gw import penalty
from tests.integration import pop3_helpers as helpers
from tests.integration import realpeers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401

FAILED = b"-ERR [AUTH] Authentication failed"
USERS = {"john": "johnsecret", "alice": "alicesecret"}
MAXBAD = 2


@pytest.fixture
def world(shared_dir):
    """Dovecot with john's and alice's mail, pop3-gw in front of it with
    maxbad 2 (the penalty delays 1 s then 2 s keep the test short)."""
    realpeers.require_root()
    with realpeers.Dovecot(shared_dir / "dovecot", users=USERS) as dovecot:
        dovecot.deliver("john", b"Subject: for john\n\njohn's message\n")
        dovecot.deliver("alice", b"Subject: for alice\n\nalice's message\n")
        setup = helpers.Setup(shared_dir / "gw", "127.0.0.1:%d" % dovecot.port,
                              users=USERS, extra=("pop3-gw: maxbad %d" % MAXBAD,
                                                  "pop3-gw: badsleep 3600"))
        try:
            with helpers.Daemon(setup) as daemon:
                yield setup, daemon, dovecot
        finally:
            setup.log.close()


def attempt(daemon, user, secret, source):
    """The gateway's answer to one APOP in a session of its own, and the client."""
    client = helpers.Client(daemon.port, source=source, timeout=60)
    greeting = client.line()
    assert greeting.startswith(b"+OK"), greeting
    stamp = apop.find_timestamp(greeting)
    return client.command(b"APOP %s %s" % (user.encode(), apop.digest(stamp, secret).encode())), \
        client


def fail(daemon, user, source, times):
    for number in range(times):
        reply, client = attempt(daemon, user, "guess%d" % number, source)
        assert reply == FAILED
        client.close()


def fetch_first(client):
    """The first message's body lines, then QUIT."""
    assert client.command(b"RETR 1").startswith(b"+OK")
    lines = client.multiline()
    assert client.command(b"QUIT").startswith(b"+OK")
    client.close()
    return lines


def penalty_file(setup):
    return str(setup.authfile) + penalty.SUFFIX


def test_failures_from_one_source_do_not_lock_the_user_out(world):
    setup, daemon, dovecot = world
    fail(daemon, "john", "127.0.0.2", MAXBAD + 2)
    reply, client = attempt(daemon, "john", "johnsecret", "127.0.0.3")
    assert reply.startswith(b"+OK"), reply
    assert b"john's message" in fetch_first(client)
    setup.log.wait_for(r"penalty addr=127.0.0.2 bad=%d " % MAXBAD)
    assert "user=john" in dovecot.read_log() or "<john>" in dovecot.read_log()
    assert setup.user("john").locked_until == 0 and setup.user("john").bad == 0


def test_a_source_past_maxbad_is_refused_even_with_the_right_digest(world):
    setup, daemon, dovecot = world
    fail(daemon, "john", "127.0.0.2", MAXBAD)
    for user, secret in (("john", "johnsecret"), ("alice", "alicesecret")):
        reply, client = attempt(daemon, user, secret, "127.0.0.2")
        assert reply == FAILED, (user, reply)
        client.close()
    setup.log.wait_for(r"auth-fail .*addr=127.0.0.2 user=alice reason=\"source refused")
    # Any other source is untouched, for the same users.
    for user, secret in (("john", "johnsecret"), ("alice", "alicesecret")):
        reply, client = attempt(daemon, user, secret, "127.0.0.3")
        assert reply.startswith(b"+OK"), (user, reply)
        assert fetch_first(client)
    # ... and john's good login elsewhere does not clear the attacker's source.
    reply, client = attempt(daemon, "john", "johnsecret", "127.0.0.2")
    assert reply == FAILED
    client.close()


def test_unknown_and_existing_users_cost_the_same_work(world):
    setup, daemon, dovecot = world
    path = str(setup.authfile)
    before = os.stat(path)
    content = setup.authfile.read_bytes()
    answers = {}
    for case, user, source in (("wrong digest", "john", "127.0.0.4"),
                               ("unknown user", "mallory", "127.0.0.5")):
        reply, client = attempt(daemon, user, "wrongsecret", source)
        answers[case] = reply
        client.close()
    setup.log.wait_for(r"auth-fail .*user=mallory")
    assert set(answers.values()) == {FAILED}, answers
    after = os.stat(path)
    assert setup.authfile.read_bytes() == content
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == \
        (before.st_ino, before.st_mtime_ns, before.st_size)
    entries = penalty.load(penalty_file(setup))
    assert entries["127.0.0.4"].count == entries["127.0.0.5"].count == 1
    info = os.stat(penalty_file(setup))
    assert (info.st_uid, info.st_mode & 0o7777) == (0, 0o600)


def test_a_good_login_does_not_reset_the_guessing_budget(world):
    """The review's attack: guesses at john's secret from one source, each
    run of maxbad-1 followed by a good login to an account of the
    attacker's own (alice here), which used to clear the count."""
    setup, daemon, dovecot = world
    fail(daemon, "john", "127.0.0.6", 1)
    reply, client = attempt(daemon, "alice", "alicesecret", "127.0.0.6")
    assert reply.startswith(b"+OK"), reply
    client.close()
    fail(daemon, "john", "127.0.0.6", 1)
    # maxbad (2) bad logins in all, a good one between them: refused now
    reply, client = attempt(daemon, "john", "johnsecret", "127.0.0.6")
    assert reply.startswith(b"-ERR [AUTH]"), reply
    client.close()
    assert penalty.load(penalty_file(setup))["127.0.0.6"].count == 2
    reply, client = attempt(daemon, "john", "johnsecret", "127.0.0.7")
    assert reply.startswith(b"+OK"), reply
    assert fetch_first(client)
