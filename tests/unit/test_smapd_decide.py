"""smapd.decide: the scanner's decisions as pure functions (issue 12, item 5).

No root, no process, no file: a state, the envelope's recipients, the time
and the agent's outcomes go in, an Action comes out.
"""

from smapd import decide, state

DAY = 86400
RETRY, MAXAGE = 900, 5 * DAY
ARRIVAL = 1_700_000_000.0
POSTMASTER = "postmaster@gw.example.org"


def fresh(**fields):
    record = state.State()
    for key, value in fields.items():
        setattr(record, key, value)
    return record


def targets_of(recipients):
    return {r: [r] for r in recipients}


def attempt(record, recipients, outcomes, now, sender="a@example.net", notice=False,
            targets=None):
    return decide.settle(record, recipients, targets or targets_of(recipients), outcomes,
                         ARRIVAL, now, RETRY, MAXAGE, sender, notice, POSTMASTER)


def test_delivered_is_done():
    record, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("ok", "MTA exit 0")},
                             ARRIVAL + 1)
    assert action == decide.done()
    assert record.done == ["b@x.org"] and record.attempts == 1


def test_temporary_is_retried_after_retry():
    now = ARRIVAL + 10
    record, action = attempt(state.State(), ["b@x.org"],
                             {"b@x.org": ("temp", "MTA exit 75 EX_TEMPFAIL")}, now)
    assert action.kind == decide.RETRY and action.at == now + RETRY
    assert record.next_try == now + RETRY and record.last_error == "MTA exit 75 EX_TEMPFAIL"


def test_the_given_state_is_not_changed():
    record = fresh(attempts=2, done=["c@x.org"])
    attempt(record, ["b@x.org", "c@x.org"], {"b@x.org": ("perm", "no")}, ARRIVAL)
    assert (record.attempts, record.done, record.failed) == (2, ["c@x.org"], [])


def test_no_outcome_and_unknown_kinds_are_temporary():
    for outcomes in ({}, {"b@x.org": ("maybe", "what")}):
        record, action = attempt(state.State(), ["b@x.org"], outcomes, ARRIVAL)
        assert action.kind == decide.RETRY, outcomes
    assert attempt(state.State(), ["b@x.org"], {}, ARRIVAL)[0].last_error == decide.NO_OUTCOME


def test_permanent_is_bounced_to_the_sender_with_a_status():
    record, action = attempt(state.State(), ["b@x.org"],
                             {"b@x.org": ("perm", "MTA exit 67 EX_NOUSER Empfänger unbekannt")},
                             ARRIVAL)
    assert action.kind == decide.BOUNCE and action.to == "a@example.net"
    assert action.failures == (("b@x.org", "MTA exit 67 EX_NOUSER Empfänger unbekannt",
                                "5.1.1"),)


def test_empty_sender_bounces_to_the_postmaster():
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("perm", "EX_NOHOST")},
                        ARRIVAL, sender="")
    assert action.kind == decide.BOUNCE and action.to == POSTMASTER
    assert action.failures[0][2] == "5.1.2"


def test_a_bounce_of_a_bounce_is_quarantined_not_bounced():
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("perm", "MTA exit 67")},
                        ARRIVAL, sender="", notice=True)
    assert action.kind == decide.QUARANTINE and action.to is None
    assert action.reason == "undeliverable notice: MTA exit 67"


def test_our_notice_header_with_a_sender_is_bounced_as_usual():
    # only the empty sender and our header together make a notice
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("perm", "x")}, ARRIVAL,
                        sender="a@example.net", notice=True)
    assert action.kind == decide.BOUNCE


def test_a_notice_that_times_out_is_quarantined_too():
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("temp", "down")},
                        ARRIVAL + MAXAGE + 1, sender="", notice=True)
    assert action.kind == decide.QUARANTINE
    assert action.reason.startswith("undeliverable notice: gave up after")


def test_maxage_reached_during_a_retry_gives_up_and_bounces():
    first, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("temp", "busy")},
                            ARRIVAL + MAXAGE - 60)
    assert action.kind == decide.RETRY
    # the retry falls after maxage: the next temporary failure is the last one
    now = action.at
    assert now - ARRIVAL > MAXAGE
    record, action = attempt(first, ["b@x.org"], {"b@x.org": ("temp", "still busy")}, now)
    assert action.kind == decide.BOUNCE and record.attempts == 2
    [(recipient, reason, status)] = action.failures
    assert recipient == "b@x.org" and status == "4.4.7"
    assert reason == "gave up after %d seconds: still busy" % (now - ARRIVAL)


def test_exactly_maxage_still_retries():
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("temp", "x")},
                        ARRIVAL + MAXAGE)
    assert action.kind == decide.RETRY


def test_maxage_passed_but_delivered_is_done():
    _, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("ok", "")},
                        ARRIVAL + 10 * MAXAGE)
    assert action == decide.done()


def test_a_temporary_failure_after_a_permanent_one():
    recipients = ["b@x.org", "c@x.org"]
    # attempt 1: b fails for good, c temporarily: no bounce yet, retry c
    record, action = attempt(state.State(), recipients,
                             {"b@x.org": ("perm", "MTA exit 67 EX_NOUSER"),
                              "c@x.org": ("temp", "MTA exit 75 EX_TEMPFAIL")}, ARRIVAL + 1)
    assert action.kind == decide.RETRY
    assert record.failed == [("b@x.org", "MTA exit 67 EX_NOUSER")]
    assert record.pending(recipients) == ["c@x.org"]
    # attempt 2: only c is tried, fails temporarily again: still a retry, b kept
    record, action = attempt(record, recipients,
                             {"c@x.org": ("temp", "MTA exit 75 again")}, ARRIVAL + 1000,
                             targets={"c@x.org": ["c@x.org"]})
    assert action.kind == decide.RETRY and record.attempts == 2
    assert record.failed == [("b@x.org", "MTA exit 67 EX_NOUSER")]
    # attempt 3: c delivered: the bounce names b alone, with its first reason
    record, action = attempt(record, recipients, {"c@x.org": ("ok", "")}, ARRIVAL + 2000,
                             targets={"c@x.org": ["c@x.org"]})
    assert action.kind == decide.BOUNCE
    assert action.failures == (("b@x.org", "MTA exit 67 EX_NOUSER", "5.1.1"),)
    assert record.done == ["c@x.org"]


def test_a_temporary_failure_after_a_permanent_one_past_maxage_bounces_both():
    recipients = ["b@x.org", "c@x.org"]
    record, _ = attempt(state.State(), recipients,
                        {"b@x.org": ("perm", "EX_NOUSER"), "c@x.org": ("temp", "down")},
                        ARRIVAL)
    _, action = attempt(record, recipients, {"c@x.org": ("temp", "down")},
                        ARRIVAL + MAXAGE + 1, targets={"c@x.org": ["c@x.org"]})
    assert action.kind == decide.BOUNCE
    assert [(r, status) for r, _, status in action.failures] == \
        [("b@x.org", "5.1.1"), ("c@x.org", "4.4.7")]


def test_more_recipients_than_one_request_go_on_at_once():
    recipients = ["r%d@x.org" % n for n in range(3)]
    record, action = attempt(state.State(), recipients, {"r0@x.org": ("ok", "")}, ARRIVAL,
                             targets={"r0@x.org": ["r0@x.org"]})
    assert action.kind == decide.NEXT and record.next_try == 0.0
    assert record.pending(recipients) == ["r1@x.org", "r2@x.org"]


def test_one_target_for_several_recipients():
    # a bare "postmaster" and the postmaster address are delivered as one
    recipients = ["postmaster", POSTMASTER]
    record, action = attempt(state.State(), recipients, {POSTMASTER: ("ok", "")}, ARRIVAL,
                             targets={POSTMASTER: recipients})
    assert action == decide.done() and record.done == recipients


def test_outcome_texts_are_kept_as_one_bounded_printable_line():
    text = "line one\nline\ttwo\x1b[31m" + "x" * 5000
    record, action = attempt(state.State(), ["b@x.org"], {"b@x.org": ("perm", text)}, ARRIVAL)
    reason = action.failures[0][1]
    assert len(reason) <= state.MAX_TEXT and reason.isprintable()
    record, _ = attempt(state.State(), ["b@x.org"], {"b@x.org": ("temp", text)}, ARRIVAL)
    assert len(record.last_error) <= state.MAX_TEXT and record.last_error.isprintable()


def test_finish_without_failures_is_done_and_with_failures_bounces():
    assert decide.finish(fresh(done=["b@x.org"]), "a@x.org", False, POSTMASTER) == decide.done()
    action = decide.finish(fresh(failed=[("b@x.org", "gave up after 9 seconds: x")]),
                           "a@x.org", False, POSTMASTER)
    assert action == decide.bounce_to("a@x.org", [("b@x.org", "gave up after 9 seconds: x",
                                                   "4.4.7")])


def test_is_due():
    assert decide.is_due(state.State(), ARRIVAL)
    later = fresh(next_try=ARRIVAL + 10)
    assert not decide.is_due(later, ARRIVAL)
    assert decide.is_due(later, ARRIVAL + 10)
    assert decide.is_due(later, ARRIVAL, force=True)


def test_status_of():
    assert decide.status_of("MTA exit 67 EX_NOUSER") == "5.1.1"
    assert decide.status_of("MTA exit 65 EX_DATAERR") == "5.6.0"
    assert decide.status_of("mailhub said 550 no") == "5.0.0"


def test_an_arrival_that_is_no_time_gives_up_instead_of_raising():
    for arrival in (float("nan"), float("inf"), float("-inf")):
        record, action = decide.settle(state.State(), ["b@x.org"], targets_of(["b@x.org"]),
                                       {"b@x.org": ("temp", "busy")}, arrival, ARRIVAL,
                                       RETRY, MAXAGE, "a@x.org", False, POSTMASTER)
        assert action.kind == decide.BOUNCE, arrival
        assert action.failures[0][1].startswith("gave up after")
