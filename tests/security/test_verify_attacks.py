"""Attacks on recipient verification (issue 14): a hostile mail hub
stand-in on loopback that hangs, trickles, answers garbage, multi-line
junk, 250 to everything or closes; a flood of RCPTs for random addresses
against the real prober loop (the hub sees at most verify-rate probes a
second and one per address); datagrams from the jailed side that are not
addresses.  What must hold: a probe never sends DATA, a hub that is not a
well-behaved SMTP server never yields a positive or negative answer
(only `unavailable`, a temporary failure), every probe ends by
deliver-timeout."""

import os
import random
import socket
import threading
import time

import pytest

from common import verifycache as cache
from smapd import prober
from tests.unit.smap_fixtures import RecordingLog


class HostileHub:
    """A TCP server on 127.0.0.1 running `script(conn, hub)` per connection
    in a thread; records every line a client sent and when each connection
    came."""

    def __init__(self, script):
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lines, self.connections = [], []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.listener.settimeout(0.1)
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections.append(time.monotonic())
            threading.Thread(target=self.run, args=(conn,), daemon=True).start()

    def run(self, conn):
        conn.settimeout(10)
        try:
            self.script(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def readline(self, conn, buffer=[b""]):
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = conn.recv(1)
            if not chunk:
                raise OSError("closed")
            data += chunk
        with self.lock:
            self.lines.append(data)
        return data

    def stop(self):
        self.running = False
        self.listener.close()


def polite(conn, hub, rcpt=b"250 2.1.5 Ok"):
    conn.sendall(b"220 hub ESMTP\r\n")
    while True:
        line = hub.readline(conn).upper()
        if line.startswith(b"RCPT"):
            conn.sendall(rcpt + b"\r\n")
        elif line.startswith(b"QUIT"):
            conn.sendall(b"221 bye\r\n")
            return
        elif line.startswith(b"EHLO"):
            conn.sendall(b"250-hub\r\n250 8BITMIME\r\n")
        else:
            conn.sendall(b"250 ok\r\n")


def run_probe(script, timeout=3, recipient="john@example.org"):
    hub = HostileHub(script)
    try:
        started = time.monotonic()
        result = prober.probe(("127.0.0.1", hub.port), "gw.example.org", recipient, timeout)
        return result, time.monotonic() - started, hub
    finally:
        hub.stop()


def test_a_well_behaved_hub_is_asked_without_data():
    (kind, text), _, hub = run_probe(polite)
    assert (kind, text) == (cache.OK, "250 2.1.5 Ok")
    assert hub.lines == [b"EHLO gw.example.org\r\n", b"MAIL FROM:<>\r\n",
                         b"RCPT TO:<john@example.org>\r\n", b"RSET\r\n", b"QUIT\r\n"]


def test_a_refusing_hub_gives_its_reply():
    (kind, text), _, hub = run_probe(
        lambda conn, hub: polite(conn, hub, b"550 5.1.1 <john@example.org>: User unknown"))
    assert (kind, text) == (cache.REJECT, "550 5.1.1 <john@example.org>: User unknown")
    assert not any(line.upper().startswith(b"DATA") for line in hub.lines)


def test_a_250_to_everything_is_not_a_greeting():
    """250 as the banner and to every line: not SMTP, so no answer at all."""
    def yes(conn, hub):
        conn.sendall(b"250 ok\r\n")
        while True:
            hub.readline(conn)
            conn.sendall(b"250 ok\r\n")
    (kind, text), _, hub = run_probe(yes)
    assert kind == cache.UNAVAILABLE and "greeted with 250" in text
    assert hub.lines == []


def test_a_hub_saying_250_to_every_command_still_never_gets_data():
    def yes(conn, hub):
        conn.sendall(b"220 hub\r\n")
        while True:
            hub.readline(conn)
            conn.sendall(b"250 ok\r\n")
    (kind, _), _, hub = run_probe(yes)
    assert kind == cache.OK         # it says the user exists: mail is accepted, as today
    assert [line.split()[0] for line in hub.lines] == [b"EHLO", b"MAIL", b"RCPT", b"RSET", b"QUIT"]


def test_a_hub_that_hangs_is_cut_at_deliver_timeout():
    (kind, text), took, _ = run_probe(lambda conn, hub: time.sleep(5), timeout=1)
    assert (kind, text) == (cache.UNAVAILABLE, "mail hub timed out")
    assert 0.9 <= took < 2


def test_a_hub_that_trickles_is_cut_at_deliver_timeout_as_a_whole():
    def trickle(conn, hub):
        for _ in range(100):
            conn.sendall(b"2")
            time.sleep(0.2)
    (kind, text), took, _ = run_probe(trickle, timeout=1)
    assert kind == cache.UNAVAILABLE and "timed out" in text
    assert took < 2


def test_a_hub_that_hangs_after_rcpt_answer_keeps_the_answer():
    def hang_after_rcpt(conn, hub):
        conn.sendall(b"220 hub\r\n")
        for reply in (b"250 hub", b"250 ok", b"550 5.1.1 no such user"):
            hub.readline(conn)
            conn.sendall(reply + b"\r\n")
        time.sleep(5)
    (kind, text), took, _ = run_probe(hang_after_rcpt, timeout=1)
    assert (kind, text) == (cache.REJECT, "550 5.1.1 no such user")
    assert took < 2


@pytest.mark.parametrize("banner, why", [
    (b"hello there\r\n", "garbage"),
    (b"22O ok\r\n", "garbage"),
    (b"220 ok\n", "malformed"),                       # bare LF
    (b"220 ok\rmore\r\n", "malformed"),               # bare CR
    (b"220" + b"x" * 5000, "malformed"),              # an endless line
    (b"220-a\r\n221 b\r\n", "changed the code"),
    (b"220-junk\r\n" * 200, "endless reply"),
    (b"220 ok\r\n250 unasked\r\n", "out of turn"),    # pipelined junk
    (b"", "closed the connection"),
    (b"999 what\r\n", "garbage"),
    (b"554 go away\r\n", "greeted with 554"),
])
def test_a_hub_answering_garbage_is_a_temporary_failure(banner, why):
    def script(conn, hub):
        conn.sendall(banner)
        time.sleep(0.5)
    (kind, text), _, hub = run_probe(script)
    assert kind == cache.UNAVAILABLE and why in text
    assert not any(line.startswith(b"RCPT") for line in hub.lines)


@pytest.mark.parametrize("rcpt_reply, why", [
    (b"250-yes\r\n550 no", "changed the code"),
    (b"450 4.2.0 try later", "deferred RCPT"),
    (b"250 ok\r\n250 extra", "out of turn"),
    (b"5x0 no", "garbage"),
])
def test_a_junk_answer_to_rcpt_is_a_temporary_failure(rcpt_reply, why):
    (kind, text), _, _ = run_probe(lambda conn, hub: polite(conn, hub, rcpt_reply))
    assert kind == cache.UNAVAILABLE and why in text


def test_a_hub_that_closes_at_once_or_is_not_there():
    (kind, text), _, _ = run_probe(lambda conn, hub: None)
    assert kind == cache.UNAVAILABLE and "closed" in text
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    kind, text = prober.probe(("127.0.0.1", port), "gw", "a@example.org", 2)
    assert kind == cache.UNAVAILABLE and "unreachable" in text


def test_a_hub_refusing_the_null_sender_is_not_an_answer():
    def no_bounces(conn, hub):
        conn.sendall(b"220 hub\r\n")
        hub.readline(conn)
        conn.sendall(b"250 hub\r\n")
        hub.readline(conn)
        conn.sendall(b"553 5.7.1 no null senders\r\n")
        hub.readline(conn)
    (kind, text), _, _ = run_probe(no_bounces)
    assert kind == cache.UNAVAILABLE and "MAIL FROM:<>" in text


# -- the whole prober loop under a flood ----------------------------------------

class RunningProber:
    """The real Prober.run loop in a thread, on a real datagram socket in tmp."""

    def __init__(self, root, hub_port, rate, timeout=5):
        self.root = str(root)
        self.spool_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.log = RecordingLog()
        self.store = cache.Store(self.spool_fd, self.log)
        self.sock = prober.bind(self.spool_fd)
        settings = prober.Settings(("127.0.0.1", hub_port), timeout, ["example.org"], rate,
                                   2678400, 10800, "gw.example.org")
        self.machine = prober.Prober(settings, self.store, self.log, self.sock)
        self.stop_read, self.stop_write = os.pipe()
        self.thread = threading.Thread(target=self.machine.run, args=(self.stop_read,),
                                       daemon=True)
        self.thread.start()

    def stop(self):
        os.close(self.stop_write)
        self.thread.join(10)
        os.close(self.stop_read)
        self.sock.close()
        self.store.close()
        os.close(self.spool_fd)


def send(root, data, sock=None):
    own = sock is None
    sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.sendto(data, os.path.join(str(root), cache.SOCKET))
    finally:
        if own:
            sock.close()


def wait_until(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in %ss" % timeout
        time.sleep(0.02)


def test_a_flood_of_random_rcpts_reaches_the_hub_at_verify_rate_and_once_per_address(tmp_path):
    rate = 5
    hub = HostileHub(lambda conn, hub: polite(conn, hub, b"550 5.1.1 unknown"))
    running = RunningProber(tmp_path, hub.port, rate)
    try:
        names = ["%08x@example.org" % random.getrandbits(32) for _ in range(15)]
        asker = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        asker.bind("")
        for _ in range(4):                  # every address asked four times
            for name in names:
                send(tmp_path, name.encode(), asker)
        wait_until(lambda: len([e for e in running.log.events if e[1] == "probe"]) == 15)
        times = sorted(hub.connections)
        assert len(times) == 15             # one probe per address, however often asked
        for index in range(len(times) - rate):
            # rate+1 consecutive connections span at least one second
            assert times[index + rate] - times[index] >= 0.95, times
        rcpts = sorted(line for line in hub.lines if line.startswith(b"RCPT"))
        assert rcpts == sorted(b"RCPT TO:<%s>\r\n" % n.encode() for n in names)
        assert not any(line.startswith(b"DATA") for line in hub.lines)
        for name in names:
            record, _ = cache.read(str(tmp_path), name, time.time(), running.machine.settings.ttls)
            assert record.kind == cache.REJECT
        probes = [f for _, e, f in running.log.events if e == "probe"]
        assert sorted(f["to"] for f in probes) == sorted("<%s>" % n for n in names)
        assert {f["result"] for f in probes} == {"reject"}
        # asked again now: answered from the cache, no new probe
        for name in names:
            send(tmp_path, name.encode(), asker)
        time.sleep(0.3)
        assert len(hub.connections) == 15
        asker.close()
    finally:
        running.stop()
        hub.stop()


def test_datagrams_from_the_jailed_side_that_are_not_addresses(tmp_path):
    hub = HostileHub(polite)
    running = RunningProber(tmp_path, hub.port, 10)
    try:
        bad = [b"", b"x" * 5000, b"-bs@example.org", b"|cat@example.org", b"a@b@example.org",
               b"a@evil.example", b"\xff\xfe@example.org", b"a b@example.org",
               b"john@example.org\r\nDATA"]
        for data in bad:
            send(tmp_path, data)
        send(tmp_path, b"fine@example.org")
        wait_until(lambda: any(e[1] == "probe" for e in running.log.events))
        refused = [f["reason"] for _, e, f in running.log.events if e == "probe-refuse"]
        assert len(refused) == len(bad) - 1 or len(refused) == len(bad)   # the empty one may not arrive
        assert [line for line in hub.lines if line.startswith(b"RCPT")] == [
            b"RCPT TO:<fine@example.org>\r\n"]
    finally:
        running.stop()
        hub.stop()


def test_a_corrupt_cache_file_is_rebuilt_by_the_next_probe(tmp_path):
    hub = HostileHub(polite)
    running = RunningProber(tmp_path, hub.port, 10)
    try:
        running.store.write("a@example.org", cache.Record(cache.REJECT, int(time.time()),
                                                         int(time.time()) + 100, "550 x"))
        path = tmp_path / cache.relative_path("a@example.org")
        path.write_bytes(path.read_bytes()[:-5] + b"zzzz\n")
        ttls = running.machine.settings.ttls
        # never trusted: reported damaged, or already swept away by the running prober
        assert cache.read(str(tmp_path), "a@example.org", time.time(), ttls)[0] is None
        send(tmp_path, b"a@example.org")
        wait_until(lambda: cache.read(str(tmp_path), "a@example.org", time.time(), ttls)[0])
        assert cache.read(str(tmp_path), "a@example.org", time.time(), ttls)[0].kind == cache.OK
    finally:
        running.stop()
        hub.stop()
