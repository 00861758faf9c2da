"""Load against the real `smap --daemon` (and pop3-gw's child bound).

* 200 SMTP sessions open at the same moment (a barrier holds them all
  after EHLO) each deliver one message: all 200 get "250", all 200 are in
  the queue, byte for byte the message each sent.
* Slow clients that drip one byte every second or two are cut at `timeout`
  (421 and close, before they have finished their line), and while they
  hang on, a normal client still gets its message through.
* The number of session processes is bounded by `maxchildren`: the next
  connection gets 421 and is closed, and /proc never shows more; a freed
  process serves the next connection (`maxuse`), or, with `maxuse 1`, is
  replaced by a new one.

The 200-session POP3 load through pop3-gw to Dovecot is
tests/integration/test_pop3gw_relay.py::test_two_hundred_concurrent_sessions
(issue 4); here pop3-gw's `maxchildren` bound is checked the same way.
"""

import threading
import time

import pytest

from tests.integration import pop3_helpers, realpeers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401
from tests.integration.smap_helpers import title_of
from tests.integration.smapd_helpers import children_of
from tests.security.harness import SmapSetup, queue_id_of

pytestmark = pytest.mark.integration

SESSIONS = 200


@pytest.fixture
def smap_factory(tmp_path):
    made = []

    def start(**kwargs):
        setup = SmapSetup(tmp_path / ("smap%d" % len(made)), **kwargs)
        made.append(setup)
        _, port = setup.daemon()
        setup.port = port
        return setup
    yield start
    for setup in made:
        setup.stop()


def test_two_hundred_concurrent_smtp_sessions_all_succeed(smap_factory):
    setup = smap_factory(maxchildren=SESSIONS + 20, timeout=60)
    barrier = threading.Barrier(SESSIONS, timeout=60)
    results = [None] * SESSIONS

    def session(number):
        client = None
        try:
            client = setup.connect(setup.port, timeout=60)
            assert client.reply()[0] == 220
            assert client.cmd("EHLO load%d.example.org" % number)[0] == 250
            barrier.wait()                         # all 200 sessions are open now
            assert client.cmd("MAIL FROM:<load%d@example.org>" % number)[0] == 250
            assert client.cmd("RCPT TO:<user%d@example.com>" % number)[0] == 250
            assert client.cmd("DATA")[0] == 354
            client.send(b"Subject: load %d\r\n\r\nmessage number %d\r\n.\r\n" % (number, number))
            code, text = client.reply()
            assert code == 250, text
            results[number] = queue_id_of(text)
            assert client.cmd("QUIT")[0] == 221
        except BaseException as err:           # reported below, with the session number
            results[number] = err
            barrier.abort()

    threads = [threading.Thread(target=session, args=(n,)) for n in range(SESSIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    failures = [(n, r) for n, r in enumerate(results) if not isinstance(r, str)]
    assert failures == [], failures[:5]
    assert sorted(results) == setup.queued()
    for number, queue_id in enumerate(results):
        envelope, message = setup.message(queue_id)
        assert envelope["rcpt"] == ["user%d@example.com" % number]
        assert message.endswith(b"Subject: load %d\r\n\r\nmessage number %d\r\n"
                                % (number, number))


def test_slow_drip_clients_are_cut_at_timeout_and_do_not_starve_others(smap_factory):
    setup = smap_factory(timeout=3)
    line = b"MAIL FROM:<slow@example.org>\r\n"
    drips = []
    for _ in range(5):
        client = setup.connect(setup.port, timeout=30)
        assert client.reply()[0] == 220
        assert client.cmd("EHLO slow.example.org")[0] == 250
        drips.append(client)
    outcome = {}

    def drip(number, client):
        # one byte every 1.5 s: never idle for 3 s, but the line takes 45 s
        sent = 0
        client.sock.settimeout(1.5)
        deadline = time.monotonic() + 40
        while sent < len(line) and time.monotonic() < deadline:
            try:
                client.send(line[sent:sent + 1])
                sent += 1
            except OSError:
                break
            try:
                data = client.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            outcome[number] = (sent, data)
            return
        outcome[number] = (sent, None)

    threads = [threading.Thread(target=drip, args=(n, c)) for n, c in enumerate(drips)]
    for thread in threads:
        thread.start()
    # meanwhile a normal client gets its message through
    client = setup.connect(setup.port)
    assert client.reply()[0] == 220
    assert client.cmd("EHLO quick.example.org")[0] == 250
    assert client.cmd("MAIL FROM:<quick@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<user@example.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: quick\r\n\r\nquick\r\n.\r\n")
    code, text = client.reply()
    assert code == 250, text
    for thread in threads:
        thread.join(60)
    assert len(outcome) == 5
    for number, (sent, data) in outcome.items():
        assert data is not None and data.startswith(b"421"), (number, sent, data)
        assert sent < len(line), "the drip client finished its line before the cut"
    assert setup.queued() == [queue_id_of(text)]


def busy_workers(daemon_pid):
    return [pid for pid in children_of(daemon_pid) if title_of(pid) != b"smap: waiting"]


@pytest.mark.parametrize("maxuse", [100, 1])
def test_children_are_bounded_by_maxchildren(smap_factory, maxuse):
    setup = smap_factory(maxchildren=5, timeout=60, lines=["smap: maxuse %d" % maxuse])
    daemon = setup.processes[0]
    held = []
    for _ in range(5):
        client = setup.connect(setup.port)
        assert client.reply()[0] == 220
        held.append(client)
    realpeers.wait_until(lambda: len(busy_workers(daemon.pid)) == 5, 10, what="5 busy")
    assert len(children_of(daemon.pid)) == 5
    extra = setup.connect(setup.port)
    code, text = extra.reply()
    assert code == 421, text
    assert extra.closed_by_server(10)
    assert len(children_of(daemon.pid)) == 5
    assert "busy children=5" in setup.logs.wait_for("busy")
    # a slot freed is a slot usable again: the same process (maxuse 100),
    # or a new one in its place (maxuse 1)
    before = set(busy_workers(daemon.pid))
    assert held.pop().cmd("QUIT")[0] == 221
    realpeers.wait_until(lambda: len(busy_workers(daemon.pid)) == 4, 10, what="a worker freed")
    freed = before - set(busy_workers(daemon.pid))
    assert len(freed) == 1
    again = setup.connect(setup.port)
    assert again.reply()[0] == 220
    after = set(realpeers.wait_until(
        lambda: len(busy_workers(daemon.pid)) == 5 and busy_workers(daemon.pid), 10,
        what="5 busy again"))
    assert len(children_of(daemon.pid)) == 5
    if maxuse == 1:
        assert not freed & set(children_of(daemon.pid)) and after != before
    else:
        assert after == before


def test_pop3_gw_children_are_bounded_by_maxchildren(shared_dir):
    realpeers.require_root()
    setup = pop3_helpers.Setup(shared_dir / "gw", "127.0.0.1:9", extra=("pop3-gw: maxchildren 4",))
    try:
        with pop3_helpers.Daemon(setup) as daemon:
            held = []
            for _ in range(4):
                client = pop3_helpers.Client(daemon.port, timeout=20)
                assert client.line().startswith(b"+OK")
                held.append(client)
            extra = pop3_helpers.Client(daemon.port, timeout=20)
            try:
                answer = extra.line()
            except EOFError:
                answer = b""
            assert not answer.startswith(b"+OK"), answer
            assert extra.closed()
            sessions = [pid for pid in pop3_helpers.session_children(daemon.proc.pid)]
            assert 0 < len(sessions) <= 4 * 2      # a session child may have one helper
    finally:
        setup.log.close()


def test_pop3_gw_slow_drip_client_is_cut_at_timeout(shared_dir):
    realpeers.require_root()
    setup = pop3_helpers.Setup(shared_dir / "gw", "127.0.0.1:9")
    setup.lines = [line for line in setup.lines if "timeout" not in line] + \
        ["pop3-gw: timeout 3"]
    setup.write_table()
    line = b"APOP alice 0123456789abcdef0123456789abcdef\r\n"
    try:
        with pop3_helpers.Daemon(setup) as daemon:
            client = pop3_helpers.Client(daemon.port, timeout=30)
            assert client.line().startswith(b"+OK")
            client.sock.settimeout(1.5)
            sent, answer = 0, None
            deadline = time.monotonic() + 40
            while sent < len(line) and time.monotonic() < deadline:
                try:
                    client.send(line[sent:sent + 1])
                    sent += 1
                    answer = client.sock.recv(4096)
                    break
                except TimeoutError:
                    continue
                except OSError:
                    answer = b""
                    break
            assert answer is not None and sent < len(line), (sent, answer)
    finally:
        setup.log.close()
