"""smapd.agent: the request checks and the MTA run (with /bin/sh-free stand-ins)."""

import os
import sys

import pytest

from common import spool
from smapd import agent


@pytest.fixture
def spool_file(tmp_path):
    path = tmp_path / "message"
    path.write_bytes(b"ENVELOPE\n\nFrom: a@b.sub.example.org\r\n\r\nline\r\n.\r\n\xe9\r\nEND\n")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def request(**changes):
    values = dict(message_id="ABCD", sender="a@example.org", hub=[], mta=["b@example.org"],
                  offset=10, length=41)
    values.update(changes)
    return agent.encode_request(**values)


def test_good_request_decodes(spool_file):
    decoded = agent.decode_request(request(), spool_file, False)
    assert decoded["mta"] == ["b@example.org"] and decoded["head"] is None


@pytest.mark.parametrize("changes", [
    {"message_id": "../etc"}, {"sender": "-oQ/tmp"}, {"mta": ["|/bin/sh"]},
    {"mta": ["/etc/passwd"]}, {"mta": []}, {"mta": ["x@example.org"] * 2},
    {"mta": ["r%d@example.org" % n for n in range(101)]},
    {"hub": ["c@example.org"]}, {"offset": -1}, {"length": 10 ** 6},
])
def test_bad_requests_are_refused(spool_file, changes):
    with pytest.raises(agent.BadRequest):
        agent.decode_request(request(**changes), spool_file, False)


def test_unknown_keys_and_junk_are_refused(spool_file):
    for data in (b"{}", b"not json", b"[1]", request()[:-1] + b',"x":1}', b"x" * 300000):
        with pytest.raises(agent.BadRequest):
            agent.decode_request(data, spool_file, True)


def test_chunks_convert_crlf_and_replace_head(spool_file):
    decoded = agent.decode_request(request(head=b"From: a@example.org\r\n\r\n"), spool_file, False)
    assert b"".join(agent.message_chunks(spool_file, decoded, True)) == \
        b"From: a@example.org\n\nline\n.\n\xe9\n"
    decoded = agent.decode_request(request(), spool_file, False)
    assert b"".join(agent.message_chunks(spool_file, decoded, False)) == \
        b"From: a@b.sub.example.org\r\n\r\nline\r\n.\r\n\xe9\r\n"


def python_mta(code):
    return [sys.executable, "-c",
            "import sys; sys.stdin.buffer.read(); sys.exit(%d)" % code]


@pytest.mark.parametrize("code, kind", [(0, "ok"), (75, "temp"), (71, "temp"), (74, "temp"),
                                        (73, "temp"), (69, "temp"), (67, "perm"),
                                        (65, "perm"), (1, "perm")])
def test_exit_codes(code, kind):
    got, text = agent.run_mta(python_mta(code), "a@example.org", ["b@example.org"],
                              [b"x\n"], 30)
    assert got == kind, text


def test_timeout_kills_and_is_temporary():
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    kind, text = agent.run_mta(hang, "a@example.org", ["b@example.org"], [b"x\n" * 100000], 1)
    assert kind == "temp" and "timed out" in text


def test_missing_mta_is_temporary():
    kind, text = agent.run_mta(["/nonexistent/sendmail"], "", ["b@example.org"], [b"x"], 5)
    assert kind == "temp" and "cannot run" in text


# -- the agent under load: workers that have reported but not yet exited ----

class Config(dict):
    pass


class Quiet:
    def __getattr__(self, name):
        return lambda *args, **fields: None


def test_workers_slow_to_exit_do_not_make_the_agent_busy(tmp_path):
    """A scanner that keeps at most `maxchildren` requests in flight must never
    hear "agent busy": on a loaded machine a worker can report and then take a
    while to exit, and a busy answer is a temporary failure that defers a
    deliverable message (smapd --once then left it behind: 115 of 2,000 in
    the benchmark's first drain)."""
    import json
    import socket
    import time

    path = tmp_path / "message"
    path.write_bytes(b"ENVELOPE\n\nFrom: a@example.org\r\n\r\nline\r\n")
    maxchildren, total = 2, 12
    scanner_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            scanner_end.close()
            real_exit = os._exit

            def linger(code):       # every worker reports, then lingers before exiting
                time.sleep(0.4)
                real_exit(code)
            os._exit = linger
            config = Config({"sendmail": ["/bin/sh", "-c", "exec cat >/dev/null", "mta"],
                             "mailhub": None, "deliver-timeout": 30,
                             "maxchildren": maxchildren})
            status = agent.Agent(agent_end, config, Quiet(), "test.example.org").run()
        finally:
            real_exit(status)
    agent_end.close()
    scanner_end.settimeout(30)
    ids = [spool.new_id() for _ in range(total)]
    outcomes = {}
    sent = 0
    try:
        def send():
            nonlocal sent
            fd = os.open(path, os.O_RDONLY)
            try:
                data = agent.encode_request(ids[sent], "a@example.org", [],
                                            ["r%d@example.org" % sent], 10, 29)
                socket.send_fds(scanner_end, [data], [fd])
            finally:
                os.close(fd)
            sent += 1
        for _ in range(maxchildren):
            send()
        while len(outcomes) < total:
            message_id, result = agent.decode_result(scanner_end.recv(agent.MAX_RESULT))
            outcomes[message_id] = result
            if sent < total:
                send()          # one settled, one more: never more than maxchildren in flight
    finally:
        scanner_end.close()
        _, status = os.waitpid(pid, 0)
    assert sorted(outcomes) == sorted(ids)
    for message_id, result in outcomes.items():
        assert [kind for _, kind, _ in result] == ["ok"], (message_id, result)
    assert os.waitstatus_to_exitcode(status) == 0


# -- issue 11, finding 4: outcome texts are bounded, printable and keep their bytes

def test_mta_outcome_keeps_any_bytes_visibly_and_bounded():
    assert agent.mta_outcome(67, "Empfänger unbekannt".encode()) == \
        ("perm", "MTA exit 67 EX_NOUSER Empfänger unbekannt")
    assert agent.mta_outcome(67, b"Empf\xe4nger unbekannt") == \
        ("perm", "MTA exit 67 EX_NOUSER Empf\\xe4nger unbekannt")
    kind, text = agent.mta_outcome(75, b"\x00\x1b[31m\r\nsecond\tline\x7f" + b"\xff" * 5000)
    assert kind == "temp" and text.isprintable() and text.isascii()
    assert len(text) <= len("MTA exit 75 EX_TEMPFAIL ") + agent.MAX_DIAGNOSTIC
    assert agent.mta_outcome(0, b"\xff") == ("ok", "MTA exit 0")
    assert agent.mta_outcome(-9, b"")[0] == "temp"
    assert agent.mta_outcome(3, b"")[1] == "MTA exit 3 exit 3"


def test_hub_outcome_of_any_reply():
    assert agent.hub_outcome(550, b"5.1.1 <b@x> unbekannt \xe4\r\n more") == \
        ("perm", "mailhub said 550 5.1.1 <b@x> unbekannt \\xe4 more")
    assert agent.hub_outcome(451, "try later")[0] == "temp"
    assert agent.hub_outcome(250, b"ok")[0] == "ok"
    kind, text = agent.hub_outcome(421, b"\x00" * 100000)
    assert kind == "temp" and len(text) <= 40 + agent.MAX_DIAGNOSTIC


def test_diagnostic():
    assert agent.diagnostic(b"  a \n\n b\t") == "a b"
    assert agent.diagnostic("x" * 1000) == "x" * agent.MAX_DIAGNOSTIC
    assert agent.diagnostic(b"\xc3") == "\\xc3"           # a cut UTF-8 sequence
