"""smapd's prober as a state machine (no sockets, no network): which
datagrams it refuses, one probe in flight per address, the verify-rate
window, the queue bound, the pause after an unreachable hub, and what it
writes to the cache."""

import os

import pytest

from common import verifycache as cache
from smapd import prober
from tests.unit.smap_fixtures import RecordingLog

NOW = 1_800_000_000


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeSocket:
    def __init__(self):
        self.sent = []

    def sendto(self, data, address):
        self.sent.append((data, address))


@pytest.fixture
def machine(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    store = cache.Store(fd)
    monotonic = Clock()
    launched = []
    settings = prober.Settings(("127.0.0.1", 2526), 5, ["example.org"], 3, 2678400, 10800,
                               "gw.example.org")
    log = RecordingLog()
    machine = prober.Prober(settings, store, log, FakeSocket(), clock=lambda: NOW,
                            monotonic=monotonic)
    machine.launch = lambda key, recipient, number=0: launched.append(recipient)
    machine.test = (launched, monotonic, log, tmp_path)
    yield machine
    store.close()
    os.close(fd)
    os.close(machine.wake_read)
    os.close(machine.wake_write)


def complete(machine, key, kind, text):
    machine.results.put((key, machine.inflight[key][2], kind, text))
    machine.finish()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty request"),
    (b"a" * 300 + b"@example.org", "request over"),
    (b"j\xc3\xb6rg@example.org", "not ASCII"),
    (b"-oQ/tmp/x@example.org", "not an address"),
    (b"|/bin/sh@example.org", "not an address"),
    (b"/etc/passwd", "not an address"),
    (b"john@example.org\r\nRCPT TO:<x@y>", "not an address"),
    (b"john@example.org\x00", "not an address"),
    (b"john@elsewhere.example", "not at an accept-domains domain"),
    (b"@relay:john@example.org", "not an address"),
    (b"postmaster", "not an address"),
])
def test_a_datagram_that_is_not_one_of_our_addresses_is_refused(machine, data, reason):
    launched, _, log, _ = machine.test
    machine.request(data, b"\0sender")
    machine.start_probes()
    assert launched == [] and machine.sock.sent == []
    [(level, event, fields)] = log.events
    assert event == "probe-refuse" and reason in fields["reason"]


def test_one_probe_in_flight_per_address_whatever_its_spelling(machine):
    launched, _, _, root = machine.test
    for sender in (b"\0a", b"\0b", b"\0c"):
        machine.request(b"John@Example.org", sender)
    machine.request(b"john@example.org", b"\0a")
    machine.start_probes()
    assert launched == ["John@Example.org"]
    machine.request(b"JOHN@example.org", b"\0d")    # while in flight
    machine.start_probes()
    assert launched == ["John@Example.org"]
    complete(machine, "john@example.org", cache.REJECT, "550 5.1.1 <John@Example.org>: unknown")
    assert sorted(address for _, address in machine.sock.sent) == [b"\0a", b"\0b", b"\0c", b"\0d"]
    record, _ = cache.read(str(root), "john@example.org", NOW, machine.settings.ttls)
    assert (record.kind, record.expires - record.checked) == (cache.REJECT, 10800)
    # answered now: the next request is woken at once, with no probe
    machine.sock.sent.clear()
    machine.request(b"john@example.org", b"\0e")
    machine.start_probes()
    assert launched == ["John@Example.org"] and machine.sock.sent == [(b".", b"\0e")]


def test_at_most_verify_rate_probes_in_any_second(machine):
    launched, monotonic, _, _ = machine.test
    for number in range(10):
        machine.request(b"user%d@example.org" % number, None)
    machine.start_probes()
    assert len(launched) == 3                       # verify-rate 3
    for key in list(machine.inflight):
        complete(machine, key, cache.OK, "250 ok")
    machine.start_probes()
    assert len(launched) == 3                       # finished, but the second is not over
    assert 0.99 <= machine.next_start() <= 1.0
    monotonic.now += 0.5
    machine.start_probes()
    assert len(launched) == 3
    monotonic.now += 0.5
    machine.start_probes()
    assert len(launched) == 6


def test_at_most_max_concurrent_probes_at_once(machine, monkeypatch):
    launched, monotonic, _, _ = machine.test
    machine.settings.rate = 1000
    for number in range(40):
        machine.request(b"user%d@example.org" % number, None)
    machine.start_probes()
    assert len(launched) == prober.MAX_CONCURRENT


def test_the_queue_is_bounded(machine, monkeypatch):
    launched, _, log, _ = machine.test
    monkeypatch.setattr(prober, "MAX_QUEUE", 5)
    for number in range(8):
        machine.request(b"user%d@example.org" % number, None)
    assert len(machine.queued) == 5
    assert [e for _, e, _ in log.events].count("probe-busy") == 3


def test_an_unreachable_hub_pauses_probing_and_is_cached_as_unavailable(machine):
    launched, monotonic, log, root = machine.test
    machine.request(b"a@example.org", b"\0a")
    machine.start_probes()
    complete(machine, "a@example.org", cache.UNAVAILABLE, "mail hub unreachable: Connection refused")
    machine.request(b"b@example.org", b"\0b")
    machine.start_probes()
    assert launched == ["a@example.org"]            # not during the pause
    record, _ = cache.read(str(root), "b@example.org", NOW, machine.settings.ttls)
    assert record.kind == cache.UNAVAILABLE and (b".", b"\0b") in machine.sock.sent
    assert record.expires - record.checked == cache.UNAVAILABLE_TTL
    probes = [f for _, e, f in log.events if e == "probe"]
    assert probes == [{"to": "<a@example.org>", "result": "unavailable",
                       "reply": "mail hub unreachable: Connection refused",
                       "duration": "0.000"}]
    monotonic.now += prober.HUB_PAUSE
    machine.request(b"c@example.org", None)
    machine.start_probes()
    assert launched == ["a@example.org", "c@example.org"]


def test_a_damaged_record_is_probed_again_and_rewritten(machine):
    launched, _, log, root = machine.test
    machine.store.write("a@example.org", cache.Record(cache.OK, NOW, NOW + 100))
    path = root / cache.relative_path("a@example.org")
    path.write_bytes(b"MWV1\tok\tgarbage\n")
    machine.request(b"a@example.org", None)
    machine.start_probes()
    assert launched == ["a@example.org"]
    assert any(e == "verify-cache" and "damaged" in f["reason"] for _, e, f in log.events)
    complete(machine, "a@example.org", cache.OK, "250 2.1.5 Ok")
    assert cache.read(str(root), "a@example.org", NOW, machine.settings.ttls)[0].kind == cache.OK


def test_a_record_due_for_refresh_is_probed_again(machine):
    launched, _, _, _ = machine.test
    machine.store.write("a@example.org", cache.Record(cache.OK, NOW - 2000000, NOW + 600000))
    machine.request(b"a@example.org", None)
    machine.start_probes()
    assert launched == ["a@example.org"]


def test_a_probe_that_raises_is_unavailable_not_stuck(machine):
    machine.launch = prober.Prober.launch.__get__(machine)
    machine.probe_function = lambda *args: 1 / 0
    machine.request(b"a@example.org", None)
    machine.start_probes()
    for _ in range(200):
        machine.finish()
        if not machine.inflight:
            break
        import time
        time.sleep(0.01)
    assert machine.inflight == {}
    assert [f["result"] for _, e, f in machine.test[2].events if e == "probe"] == ["unavailable"]


def test_a_probe_past_deliver_timeout_is_given_up_and_its_late_answer_ignored(machine):
    launched, monotonic, log, root = machine.test
    machine.request(b"slow@example.org", b"\0a")
    machine.start_probes()
    number = machine.inflight["slow@example.org"][2]
    monotonic.now += machine.settings.timeout + prober.OVERDUE_GRACE + 0.1
    machine.overdue()
    assert machine.inflight == {} and (b".", b"\0a") in machine.sock.sent
    record, _ = cache.read(str(root), "slow@example.org", NOW, machine.settings.ttls)
    assert record.kind == cache.UNAVAILABLE and "overran" in record.reply
    machine.results.put(("slow@example.org", number, cache.OK, "250 late"))
    machine.finish()        # too late: not written
    record, _ = cache.read(str(root), "slow@example.org", NOW, machine.settings.ttls)
    assert record.kind == cache.UNAVAILABLE


def test_smapd_reads_the_verification_settings_from_smaps_lines(tmp_path):
    """The prober's rate and lifetimes are smap's attributes (DESIGN §12.2):
    smapd reads smap's view of the same table; no prober without
    verify-recipients or without a hub both programs read."""
    from common import netperm, params

    def settings(text):
        path = tmp_path / "table"
        path.write_text(text)
        os.chmod(path, 0o644)
        config = netperm.load(str(path), params.SMAPD)
        assert config.errors == [] or os.geteuid() != 0
        return prober.settings_of(config, "gw.example.org")

    if os.geteuid() != 0:
        pytest.skip("the table must be root's")
    found = settings("smap, smapd: accept-domains example.org\nsmap: verify-recipients yes\n"
                     "smap, smapd: mailhub 127.0.0.1:2526\nsmap: verify-rate 3\n"
                     "smap: verify-negative-ttl 600\nsmapd: deliver-timeout 9\n")
    assert (found.hub, found.rate, found.timeout, found.accept_domains) == (
        ("127.0.0.1", 2526), 3, 9, ["example.org"])
    assert found.ttls == {cache.OK: 2678400, cache.REJECT: 600,
                          cache.UNAVAILABLE: cache.UNAVAILABLE_TTL}
    assert settings("smap, smapd: mailhub 127.0.0.1:2526\n") is None
    assert settings("smap: verify-recipients yes\nsmapd: mailhub 127.0.0.1:2526\n") is None


def test_a_failed_refresh_keeps_the_answer_that_is_still_valid(machine):
    launched, _, _, root = machine.test
    machine.store.write("a@example.org", cache.Record(cache.OK, NOW - 2000000, NOW + 600000,
                                                      "250 2.1.5 Ok"))
    machine.request(b"a@example.org", b"\0a")
    machine.start_probes()
    assert launched == ["a@example.org"]            # due: refreshed
    complete(machine, "a@example.org", cache.UNAVAILABLE, "mail hub unreachable: refused")
    record, _ = cache.read(str(root), "a@example.org", NOW, machine.settings.ttls)
    assert record.kind == cache.OK and (b".", b"\0a") in machine.sock.sent
    # and while the hub is down, no UNAVAILABLE is written over it either
    machine.request(b"a@example.org", None)
    record, _ = cache.read(str(root), "a@example.org", NOW, machine.settings.ttls)
    assert record.kind == cache.OK
