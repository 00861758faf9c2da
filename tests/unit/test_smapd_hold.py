"""What queue control (issue 16) needs from smapd's state and decisions:
the time on hold is kept in the state file, survives every attempt's
copy of the state, and does not count towards maxage; a held message's
state is no orphan.  Pure functions and a private spool, no root.
"""

import os

from common import spool
from smapd import decide, queuectl, state

DAY = 86400
ARRIVAL = 1_700_000_000.0


def test_the_held_fields_round_trip_and_damage_is_no_state(tmp_path):
    spool.make_dirs(str(tmp_path))
    record = state.State()
    record.attempts = 2
    record.held_since = ARRIVAL + 10.5
    record.held_seconds = 3600.25
    state.save(str(tmp_path), "ABCD", record)
    loaded = state.load(str(tmp_path), "ABCD")
    assert (loaded.attempts, loaded.held_since, loaded.held_seconds) == (2, ARRIVAL + 10.5,
                                                                        3600.25)
    for line in ("held-seconds inf", "held-seconds -1", "held-since nan", "held-since 1e3",
                 "held-seconds 99999999999"):
        (tmp_path / "state" / "ABCD").write_text("attempts 4\n%s\n" % line)
        loaded = state.load(str(tmp_path), "ABCD")
        assert (loaded.attempts, loaded.held_seconds, loaded.held_since) == (0, 0.0, 0.0), line
    # a state without them is written exactly as before
    assert b"held" not in state.State().encode()


def settle(record, now, maxage=5 * DAY):
    return decide.settle(record, ["b@x.org"], {"b@x.org": ["b@x.org"]},
                         {"b@x.org": ("temp", "MTA exit 75 EX_TEMPFAIL")}, ARRIVAL, now,
                         900, maxage, "a@example.net", False, "postmaster")


def test_the_time_on_hold_does_not_count_towards_maxage():
    now = ARRIVAL + 6 * DAY
    # without time on hold it is past maxage: it gives up and bounces
    _, action = settle(state.State(), now)
    assert action.kind == decide.BOUNCE and action.failures[0][2] == "4.4.7"
    # three days of it on hold: 3 days old for maxage, retried
    record = state.State()
    record.held_seconds = 3 * DAY
    new, action = settle(record, now)
    assert action == decide.retry_at(now + 900)
    assert new.held_seconds == 3 * DAY and new.attempts == 1     # kept by every attempt


def test_a_held_messages_state_is_no_orphan(tmp_path):
    spool.make_dirs(str(tmp_path))
    os.mkdir(tmp_path / spool.HOLD)
    (tmp_path / spool.HOLD / "BCDE").write_bytes(b"x")
    state.save(str(tmp_path), "BCDE", state.State())
    state.save(str(tmp_path), "ABCD", state.State())
    assert state.sweep_orphans(str(tmp_path)) == ["ABCD"]
    assert spool.held(str(tmp_path)) == ["BCDE"] and spool.queued(str(tmp_path)) == []


def test_hold_release_and_delete_move_the_message_and_keep_its_state(tmp_path):
    root = str(tmp_path)
    spool.make_dirs(root)
    message_id = spool.new_id()
    writer = spool.MessageWriter(root, message_id)
    writer.start({"id": message_id, "arrival": "%.6f" % ARRIVAL, "sender": "a@example.net",
                  "rcpt": ["b@example.org", "c@example.org"]})
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    writer.commit()
    record = state.State()
    record.done = ["b@example.org"]
    record.next_try = ARRIVAL + 900
    state.save(root, message_id, record)
    spool_dir = queuectl.Spool(root)
    try:
        detail = queuectl.hold(spool_dir, message_id)
        assert detail == {"from": "<a@example.net>", "nrcpt": 2, "size": 20}
        assert spool.held(root) == [message_id] and spool.queued(root) == []
        held = state.load(root, message_id)
        assert held.held_since > 0 and held.done == ["b@example.org"]
        [entry] = queuectl.entries(root, ARRIVAL + 60)
        assert entry["held"] and entry["next_retry"] is None and entry["age"] == 60
        assert entry["recipients"][0] == {"address": "b@example.org", "state": "delivered"}
        queuectl.release(spool_dir, message_id)
        released = state.load(root, message_id)
        assert spool.queued(root) == [message_id]
        assert (released.held_since, released.next_try) == (0.0, 0.0)
        assert released.held_seconds >= 0 and released.done == ["b@example.org"]
        queuectl.delete(spool_dir, message_id)
        assert spool.queued(root) == [] and spool.held(root) == []
        assert not os.path.exists(state.path_of(root, message_id))
    finally:
        spool_dir.close()
