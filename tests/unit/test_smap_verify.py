"""smap's side of recipient verification (smap.verify) driven through the
session state machine: the replies and log lines for cached answers, the
first RCPT that waits for its probe, a damaged cache, no prober, and
verify-fallback.  The prober is a stand-in on an AF_UNIX datagram socket
in the test's spool (no network)."""

import os
import socket
import threading
import time

import pytest

from common import netperm, params, verifycache as cache
from smap import policy, verify
from tests.unit.smap_fixtures import make_session

TTLS = cache.lifetimes(2678400, 10800)
HUB_NO = "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in local recipient table"


def open_store(root):
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    return cache.Store(fd), fd


def put(root, address, kind, reply="", age=0, ttl=None):
    store, fd = open_store(root)
    now = int(time.time()) - age
    ttl = ttl or {cache.OK: 2678400, cache.REJECT: 10800, cache.UNAVAILABLE: 30}[kind]
    store.write(cache.key_of(address), cache.Record(kind, now, now + ttl, reply))
    store.close()
    os.close(fd)


class StandInProber:
    """Binds ROOT/.verify; records every datagram; answers with `answer`
    (address -> (kind, reply)) after `delay` seconds, like the prober."""

    def __init__(self, root, answer=None, delay=0.0):
        self.root, self.answer, self.delay = str(root), answer or {}, delay
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(os.path.join(self.root, cache.SOCKET))
        self.sock.settimeout(0.1)
        self.requests = []
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                data, sender = self.sock.recvfrom(1024)
            except socket.timeout:
                continue
            self.requests.append(data)
            address = data.decode("ascii", "replace")
            if address in self.answer:
                time.sleep(self.delay)
                kind, reply = self.answer[address]
                put(self.root, address, kind, reply)
                self.sock.sendto(b".", sender)

    def close(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


VERIFIERS = []


@pytest.fixture(autouse=True)
def close_verifiers():
    yield
    while VERIFIERS:
        VERIFIERS.pop().close()


def session_with(root, **options):
    verifier = verify.Verifier(**options)
    VERIFIERS.append(verifier)
    hook = verify.VerifyRecipients(verifier, ["example.org"])
    smtp, log = make_session(root, hooks=[hook])
    assert smtp.feed(b"EHLO client.example.net\r\n").startswith(b"250")
    assert smtp.feed(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
    return smtp, log


def rejects(log):
    return [f for level, event, f in log.events if event == "reject"]


def test_cached_positive_is_accepted_and_cached_negative_gets_the_hubs_text(tmp_path):
    put(tmp_path, "john@example.org", cache.OK, "250 2.1.5 Ok")
    put(tmp_path, "nobody@example.org", cache.REJECT, HUB_NO)
    smtp, log = session_with(tmp_path, wait=0)
    assert smtp.feed(b"RCPT TO:<John@Example.org>\r\n") == b"250 2.1.5 Ok\r\n"
    assert smtp.feed(b"RCPT TO:<nobody@example.org>\r\n") == (
        b"550 5.1.1 <nobody@example.org>: Recipient address rejected: "
        b"User unknown in local recipient table\r\n")
    [refusal] = rejects(log)
    assert refusal["reason"] == "recipient verification"
    assert refusal["hub_reply"] == HUB_NO and refusal["to"] == "<nobody@example.org>"
    assert refusal["hook"] == "verify" and refusal["stage"] == "rcpt"


@pytest.mark.parametrize("reply", [
    "550",                                     # no text at all
    "550 5.1.1",                               # codes only
])
def test_a_hub_text_that_breaks_the_reply_rules_is_replaced(tmp_path, reply):
    put(tmp_path, "nobody@example.org", cache.REJECT, reply)
    smtp, log = session_with(tmp_path, wait=0)
    answer = smtp.feed(b"RCPT TO:<nobody@example.org>\r\n")
    assert answer == b"550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown\r\n"
    assert not [e for e in log.events if e[1] == "policy"]


def test_a_long_hub_text_is_cut_to_one_reply_line(tmp_path):
    put(tmp_path, "nobody@example.org", cache.REJECT, "550 5.1.1 " + "x" * 600)
    smtp, _ = session_with(tmp_path, wait=0)
    answer = smtp.feed(b"RCPT TO:<nobody@example.org>\r\n")
    assert answer.startswith(b"550 5.1.1 xxx") and len(answer) <= 512


def test_first_rcpt_waits_for_the_probe_and_gets_its_answer(tmp_path):
    prober = StandInProber(tmp_path, {"nobody@example.org": (cache.REJECT, HUB_NO),
                                      "john@example.org": (cache.OK, "250 2.1.5 Ok")},
                           delay=0.2)
    try:
        smtp, log = session_with(tmp_path, wait=5)
        started = time.monotonic()
        assert smtp.feed(b"RCPT TO:<john@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        assert smtp.feed(b"RCPT TO:<nobody@example.org>\r\n").startswith(b"550 5.1.1 <nobody@")
        # woken by the datagram, not by the poll interval
        assert time.monotonic() - started < 2 * 0.2 + 2 * verify.POLL
        assert prober.requests == [b"john@example.org", b"nobody@example.org"]
    finally:
        prober.close()


def test_no_answer_within_verify_wait_is_450_in_progress(tmp_path):
    prober = StandInProber(tmp_path)        # takes the request, never answers
    try:
        smtp, log = session_with(tmp_path, wait=1)
        started = time.monotonic()
        assert smtp.feed(b"RCPT TO:<new@example.org>\r\n") == (
            b"450 4.1.1 <new@example.org>: Recipient address rejected: verification in progress\r\n")
        assert 1 <= time.monotonic() - started < 2
        assert rejects(log)[0]["reason"] == "recipient verification in progress"
        assert prober.requests == [b"new@example.org"]
    finally:
        prober.close()


def test_a_damaged_record_is_not_trusted_and_a_probe_is_asked_for(tmp_path):
    put(tmp_path, "john@example.org", cache.OK, "250 2.1.5 Ok")
    path = tmp_path / cache.relative_path("john@example.org")
    path.write_bytes(path.read_bytes().replace(b"\tok\t", b"\tno\t"))
    prober = StandInProber(tmp_path)
    try:
        smtp, _ = session_with(tmp_path, wait=0)
        assert smtp.feed(b"RCPT TO:<john@example.org>\r\n").startswith(b"450 4.1.1 ")
        realpeers_wait(lambda: prober.requests == [b"john@example.org"])
    finally:
        prober.close()


def realpeers_wait(predicate, timeout=5):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)


def test_a_record_past_half_its_life_is_used_and_refreshed(tmp_path):
    put(tmp_path, "john@example.org", cache.OK, "250 2.1.5 Ok", age=2000, ttl=3000)
    prober = StandInProber(tmp_path)
    try:
        smtp, _ = session_with(tmp_path, wait=0)
        assert smtp.feed(b"RCPT TO:<john@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        realpeers_wait(lambda: prober.requests == [b"john@example.org"])
    finally:
        prober.close()


def test_a_fresh_record_costs_no_request(tmp_path):
    put(tmp_path, "john@example.org", cache.OK, "250 2.1.5 Ok")
    prober = StandInProber(tmp_path)
    try:
        smtp, _ = session_with(tmp_path, wait=0)
        for _ in range(3):
            assert smtp.feed(b"RCPT TO:<john@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        time.sleep(0.1)
        assert prober.requests == []
    finally:
        prober.close()


def test_hub_unavailable_defers_or_accepts_as_verify_fallback_says(tmp_path):
    put(tmp_path, "john@example.org", cache.UNAVAILABLE, "mail hub unreachable: Connection refused")
    smtp, log = session_with(tmp_path, wait=0)
    assert smtp.feed(b"RCPT TO:<john@example.org>\r\n") == (
        b"450 4.1.1 <john@example.org>: Recipient address rejected: unverified address: "
        b"mail hub unavailable, try again later\r\n")
    assert rejects(log)[0]["reason"] == "recipient verification unavailable"
    smtp, log = session_with(tmp_path, wait=0, fallback="accept")
    assert smtp.feed(b"RCPT TO:<john@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
    assert [f["reason"] for _, e, f in log.events if e == "verify-fallback"] == [
        "accepted unverified: mail hub unreachable: Connection refused"]


def test_no_prober_running_is_unavailable(tmp_path):
    smtp, log = session_with(tmp_path, wait=3)
    started = time.monotonic()
    assert smtp.feed(b"RCPT TO:<john@example.org>\r\n").startswith(b"450 4.1.1 ")
    assert time.monotonic() - started < 1          # nobody to wait for
    assert "no prober" in rejects(log)[0]["hub_reply"]


def test_postmaster_other_domains_and_relay_are_not_verified(tmp_path):
    prober = StandInProber(tmp_path)
    try:
        verifier = verify.Verifier(wait=0)
        VERIFIERS.append(verifier)
        smtp, _ = make_session(tmp_path, relay_ok=True,
                               hooks=[verify.VerifyRecipients(verifier, ["example.org"])])
        smtp.feed(b"EHLO c\r\n")
        smtp.feed(b"MAIL FROM:<a@example.net>\r\n")
        for rcpt in (b"postmaster", b"PostMaster@example.org", b"far@example.com"):
            assert smtp.feed(b"RCPT TO:<%s>\r\n" % rcpt) == b"250 2.1.5 Ok\r\n"
        time.sleep(0.05)
        assert prober.requests == []
    finally:
        prober.close()


def test_the_hook_is_installed_only_when_verification_is_on():
    off = netperm.parse("smap: accept-domains example.org\n", "t", params.SMAP)
    assert verify.hooks_for(off) == []
    on = netperm.parse("smap: accept-domains example.org\nsmap: verify-recipients yes\n"
                       "smap, smapd: mailhub 127.0.0.1:2526\nsmap: verify-wait 2\n"
                       "smap: verify-fallback accept\n", "t", params.SMAP)
    assert on.errors == []
    [hook] = verify.hooks_for(on)
    assert hook.verifier.wait == 2 and hook.verifier.fallback == "accept"


def test_the_table_check_names_what_is_wrong():
    config = netperm.parse("smap: verify-recipients yes\nsmap: verify-fallback maybe\n",
                           "t", params.SMAP)
    assert sorted(str(p) for p in config.errors) == [
        "t:1: verify-recipients yes needs a mail hub to probe: "
        "add `smap, smapd: mailhub HOST[:PORT]`",
        "t:2: verify-fallback: 'maybe' is not defer or accept"]
    # mailhub for smapd only does not reach smap
    config = netperm.parse("smap: verify-recipients yes\nsmapd: mailhub 127.0.0.1\n",
                           "t", params.SMAP)
    assert len(config.errors) == 1
    assert netperm.parse("smap: verify-recipients yes\nsmap, smapd: mailhub 127.0.0.1\n",
                         "t", params.SMAP).errors == []
    assert netperm.parse("smap, smapd: mailhub 127.0.0.1\n", "t", params.SMAPD).get(
        "mailhub") == ("127.0.0.1", 0)


def test_hub_text_takes_the_codes_away():
    assert verify.hub_text(HUB_NO) == ("<nobody@example.org>: Recipient address rejected: "
                                       "User unknown in local recipient table")
    assert verify.hub_text("550 no such user") == "no such user"
    assert verify.hub_text("junk") is None
    assert policy.reply_problem(policy.REJECT, 550, "5.1.1", verify.hub_text(HUB_NO),
                                policy.RCPT) is None
