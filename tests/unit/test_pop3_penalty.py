"""pop3gw.penalty: the per-source bad-login penalty (keys, delays, the
transaction under the lock, the bounded file trusted only as far as it
parses), and the property that makes a lockout useless against a user:
no sequence of bad logins from other sources refuses a source."""

import multiprocessing
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3gw import penalty


@pytest.mark.parametrize("address, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),                 # a dual-stack listener's IPv4 client
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:DB8:0:0:1::1", "2001:db8::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    (None, "unknown"),
    ("", "unknown"),
    ("not an address", "unknown"),
])
def test_source_key(address, key):
    assert penalty.source_key(address) == key


def test_delay_doubles_up_to_the_cap():
    assert [penalty.delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 15, 15, 15]
    assert penalty.delay(10 ** 9) == penalty.MAX_DELAY


def test_parse_keeps_only_what_parses():
    text = "\n".join([
        penalty.HEADER,
        "192.0.2.1 3 1000",
        "192.0.2.1 9 1000",                  # a second line for a key: the first counts
        "2001:db8::/64 1 5",
        "unknown 2 7",
        "192.0.2.2 0 1000",                  # a zero count is no entry
        "192.0.2.3 -1 1000",
        "192.0.2.4 x 1000",
        "192.0.2.5 1",
        "192.0.2.6 1 1000 extra",
        "evil\x00key 1 1000",
        "192.0.2.7 99999999999999 1",        # beyond any count we write
        "",
    ])
    assert penalty.parse(text) == {"192.0.2.1": penalty.Entry(3, 1000),
                                   "2001:db8::/64": penalty.Entry(1, 5),
                                   "unknown": penalty.Entry(2, 7)}
    entries = penalty.parse(text)
    assert penalty.parse(penalty.format_entries(entries)) == entries


def ledger(tmp_path, maxbad=3, badsleep=600):
    return penalty.Ledger(str(tmp_path / "auth"), maxbad, badsleep)


def outcomes(book, key, goods, now):
    return [(v.outcome, v.count, v.delay) for v in
            (book.settle(key, good, now) for good in goods)]


def test_settle_counts_refuses_and_forgets(tmp_path):
    book = ledger(tmp_path)
    assert outcomes(book, "192.0.2.1", [False, False, False], 1000) == \
        [("bad", 1, 1), ("bad", 2, 2), ("bad", 3, 4)]
    # Past maxbad: refused, right digest or wrong, and not counted.
    assert outcomes(book, "192.0.2.1", [True, False], 1100) == \
        [("refused", 3, 4), ("refused", 3, 4)]
    assert book.settle("192.0.2.1", True, 1599).until == 1600
    assert penalty.load(book.path) == {"192.0.2.1": penalty.Entry(3, 1000)}
    # Other sources are not touched.
    assert book.settle("192.0.2.2", True, 1100).outcome == "good"
    # badsleep after the last counted bad login, the source starts afresh.
    assert outcomes(book, "192.0.2.1", [False], 1600) == [("bad", 1, 1)]
    assert outcomes(book, "192.0.2.1", [True], 1601) == [("good", 1, 0)]    # not cleared
    assert penalty.load(book.path) == {"192.0.2.1": penalty.Entry(1, 1600)}
    assert outcomes(book, "192.0.2.1", [True], 2200) == [("good", 0, 0)]    # aged out
    assert penalty.load(book.path) == {}


def test_a_good_login_from_a_clean_source_writes_nothing(tmp_path):
    book = ledger(tmp_path)
    book.settle("192.0.2.1", False, 1000)
    before = os.stat(book.path)
    assert book.settle("192.0.2.2", True, 1001).outcome == "good"
    after = os.stat(book.path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_the_clock_going_back_keeps_the_count(tmp_path):
    book = ledger(tmp_path)
    book.settle("192.0.2.1", False, 5000)
    assert book.settle("192.0.2.1", False, 4000).count == 2


def test_the_file_is_root_only_and_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(penalty, "MAX_ENTRIES", 5)
    book = ledger(tmp_path, badsleep=100)
    book.settle("10.0.0.1", False, 1000)                # expired by the time the others come
    for number in range(2, 9):
        book.settle("10.0.0.%d" % number, False, 1100 + number)
    entries = penalty.load(book.path)
    assert sorted(entries) == ["10.0.0.%d" % n for n in range(4, 9)]    # the oldest went
    info = os.stat(book.path)
    assert info.st_mode & 0o7777 == 0o600 and info.st_uid == os.geteuid()
    assert not [name for name in os.listdir(tmp_path) if ".tmp." in name]


def test_a_link_or_a_file_others_may_read_is_refused(tmp_path):
    book = ledger(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, book.path)
    with pytest.raises(penalty.PenaltyError, match="symbolic link"):
        book.settle("192.0.2.1", False, 1000)
    os.unlink(book.path)
    with open(book.path, "w") as handle:
        handle.write("192.0.2.1 1 1000\n")
    os.chmod(book.path, 0o640)
    with pytest.raises(penalty.PenaltyError, match="0600"):
        penalty.load(book.path)
    assert target.read_text() == ""


def test_a_directory_others_may_write_is_refused(tmp_path):
    os.chmod(tmp_path, 0o777)
    with pytest.raises(penalty.PenaltyError):
        ledger(tmp_path).settle("192.0.2.1", False, 1000)


def test_clear_forgets_one_source(tmp_path):
    book = ledger(tmp_path)
    book.settle("192.0.2.1", False, 1000)
    book.settle("192.0.2.2", False, 1000)
    assert book.clear("192.0.2.1") and not book.clear("192.0.2.1")
    assert list(penalty.load(book.path)) == ["192.0.2.2"]


def _fail(path, key, times):
    book = penalty.Ledger(path, 10 ** 6, 10 ** 6)
    for _ in range(times):
        book.settle(key, False, 1000)


def test_concurrent_sessions_lose_no_count(tmp_path):
    path = str(tmp_path / "auth")
    workers = [multiprocessing.get_context("fork").Process(target=_fail, args=(path, key, 30))
               for key in ("192.0.2.1", "192.0.2.2", "192.0.2.1", "192.0.2.2")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = penalty.load(path + penalty.SUFFIX)
    assert entries["192.0.2.1"].count == entries["192.0.2.2"].count == 60


attempts = st.lists(st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::/64"]),
                              st.booleans(), st.integers(0, 40)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(attempts)
def test_only_a_source_s_own_bad_logins_refuse_it(tmp_path_factory, sequence):
    """Whatever the other sources do, a source is refused only when it has
    itself made maxbad counted bad logins, the last less than badsleep ago;
    and no source ever gets more than maxbad counted bad logins in a row."""
    book = penalty.Ledger(str(tmp_path_factory.mktemp("p") / "auth"), 3, 10)
    own = {}                    # key -> times of its counted bad logins (none cleared)
    now = 1000
    for key, good, step in sequence:
        now += step
        history = own[key] if own.get(key) and now - own[key][-1] < 10 else []
        verdict = book.settle(key, good, now)
        expect_refused = len(history) >= 3
        assert (verdict.outcome == "refused") == expect_refused
        if verdict.outcome == "bad":
            own[key] = history + [now]
            assert verdict.count == len(own[key]) <= 3
        elif verdict.outcome == "good":
            own[key] = history          # a good login clears nothing

