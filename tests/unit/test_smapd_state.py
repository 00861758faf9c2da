"""smapd.state: atomic per-message delivery state."""

import os

from common import spool
from smapd import state


def test_round_trip(tmp_path):
    spool.make_dirs(str(tmp_path))
    record = state.State()
    record.attempts = 3
    record.next_try = 1234.5
    record.last_error = "MTA exit 75\tEX_TEMPFAIL\nsecond line"
    record.done = ["a@example.org"]
    record.failed = [("b@example.org", "MTA exit 67 EX_NOUSER")]
    state.save(str(tmp_path), "ABCD", record)
    loaded = state.load(str(tmp_path), "ABCD")
    assert (loaded.attempts, loaded.next_try, loaded.done, loaded.failed) == \
        (3, 1234.5, ["a@example.org"], [("b@example.org", "MTA exit 67 EX_NOUSER")])
    assert "\n" not in loaded.last_error and "\t" not in loaded.last_error
    assert loaded.pending(["a@example.org", "b@example.org", "c@example.org"]) == ["c@example.org"]
    assert not loaded.finished(["a@example.org", "c@example.org"])
    assert os.listdir(tmp_path / "state") == ["ABCD"]


def test_missing_or_damaged_state_is_fresh(tmp_path):
    spool.make_dirs(str(tmp_path))
    assert state.load(str(tmp_path), "ABCD").attempts == 0
    (tmp_path / "state" / "ABCD").write_bytes(b"attempts many\n")
    assert state.load(str(tmp_path), "ABCD").attempts == 0
    (tmp_path / "state" / "ABCD").write_bytes(b"\xff\xfe")
    assert state.load(str(tmp_path), "ABCD").attempts == 0


def test_orphans_are_swept(tmp_path):
    spool.make_dirs(str(tmp_path))
    state.save(str(tmp_path), "ABCD", state.State())
    (tmp_path / "queue" / "BCDE").write_bytes(b"x")
    state.save(str(tmp_path), "BCDE", state.State())
    assert state.sweep_orphans(str(tmp_path)) == ["ABCD"]
    assert os.listdir(tmp_path / "state") == ["BCDE"]


def test_numbers_that_are_no_time_or_count_are_damage(tmp_path):
    # float() would take all of these; a next try of inf parked a message for ever
    spool.make_dirs(str(tmp_path))
    for line in ("next-try inf", "next-try nan", "next-try -inf", "next-try 1e309",
                 "next-try -1", "next-try 1e3", "next-try 99999999999", "next-try 1_0",
                 "next-try \u0663", "next-try  5", "attempts -1", "attempts 1.5",
                 "attempts 99999999999", "attempts inf"):
        (tmp_path / "state" / "ABCD").write_text("attempts 4\nnext-try 12.5\n%s\n" % line)
        loaded = state.load(str(tmp_path), "ABCD")
        assert (loaded.attempts, loaded.next_try) == (0, 0.0), line
    (tmp_path / "state" / "ABCD").write_text("attempts 4\nnext-try 12.5\n")
    loaded = state.load(str(tmp_path), "ABCD")
    assert (loaded.attempts, loaded.next_try) == (4, 12.5)


def test_a_fifo_or_a_link_as_state_is_no_state(tmp_path):
    spool.make_dirs(str(tmp_path))
    os.mkfifo(tmp_path / "state" / "ABCD")
    assert state.load(str(tmp_path), "ABCD").attempts == 0      # and it did not block
    (tmp_path / "real").write_text("attempts 4\nnext-try 12.5\n")
    os.symlink(tmp_path / "real", tmp_path / "state" / "BCDE")
    assert state.load(str(tmp_path), "BCDE").attempts == 0
    os.mkdir(tmp_path / "state" / "CDEF")
    assert state.load(str(tmp_path), "CDEF").attempts == 0


def test_save_over_a_fifo_or_a_link_left_at_the_temporary_name(tmp_path):
    spool.make_dirs(str(tmp_path))
    record = state.State()
    record.attempts = 2
    os.mkfifo(tmp_path / "state" / "ABCD.new")           # an open for writing would block
    state.save(str(tmp_path), "ABCD", record)
    assert state.load(str(tmp_path), "ABCD").attempts == 2
    (tmp_path / "elsewhere").write_text("keep")
    os.symlink(tmp_path / "elsewhere", tmp_path / "state" / "BCDE.new")
    state.save(str(tmp_path), "BCDE", record)
    assert (tmp_path / "elsewhere").read_text() == "keep"
    assert state.load(str(tmp_path), "BCDE").attempts == 2
