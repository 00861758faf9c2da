"""Checks that the real-peer helpers in realpeers.py do what they promise.

Each test starts real programs privately on loopback and asserts an
outcome (bytes delivered, lines logged), not just that something ran.
"""

import os
import poplib
import re
import socket
import subprocess
import time

import pytest

from tests.integration import realpeers

TRICKY_BODY = (b"first line\n"
               b".\n"
               b"..\n"
               b". leading dot\n"
               b"8-bit: \xe4\xf6\xfc \xff\xfe\n"
               b"From the middle\n"
               b"\n"
               b"last line\n")


def _message(subject: bytes, body: bytes = TRICKY_BODY) -> bytes:
    return (b"From: sender@example.org\n"
            b"To: rcpt@example.net\n"
            b"Subject: " + subject + b"\n"
            b"\n" + body)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- small utilities ---------------------------------------------------------

def test_free_port_is_bindable_and_loopback_only():
    port = realpeers.free_port()
    assert 1024 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    with pytest.raises(ValueError):
        realpeers.free_port("0.0.0.0")


def test_wait_for_port_times_out_boundedly():
    port = realpeers.free_port()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        realpeers.wait_for_port("127.0.0.1", port, timeout=0.3)
    assert time.monotonic() - start < 3


def test_proc_stop_kills_whole_group(tmp_path):
    realpeers.require("sh", "sleep")
    proc = realpeers.Proc(["/bin/sh", "-c", "sleep 300 & echo $! > child; wait"],
                          new_session=True, cwd=tmp_path)
    child = int(realpeers.wait_until(
        lambda: (tmp_path / "child").read_text().strip()
        if (tmp_path / "child").exists() else "", 5))
    assert proc.alive()
    proc.stop(timeout=2)
    assert proc.exited()
    realpeers.wait_until(lambda: _pid_gone(child), 5, what="child gone")


def test_require_fails_under_require_real(monkeypatch):
    monkeypatch.setenv("MAILWALL_REQUIRE_REAL", "1")
    with pytest.raises(pytest.fail.Exception, match="required real component missing"):
        realpeers.require("no-such-program-mailwall")
    monkeypatch.setenv("MAILWALL_REQUIRE_REAL", "0")
    with pytest.raises(pytest.skip.Exception):
        realpeers.require("no-such-program-mailwall")


# -- rsyslog -----------------------------------------------------------------

def test_rsyslog_logs_raw_datagram_with_tag_and_pid(rsyslog):
    assert oct(os.stat(rsyslog.socket).st_mode & 0o777) == "0o666"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"<22>test[123]: hello id=X1", str(rsyslog.socket))
    line = rsyslog.wait_for("hello id=X1")
    assert re.search(r" test\[123\]: hello id=X1$", line)
    assert rsyslog.wait_for(re.compile(r"test\[123\]: hello id=X\d")) == line
    with pytest.raises(AssertionError, match="not logged"):
        rsyslog.wait_for("never-logged", timeout=0.3)


def test_rsyslog_accepts_unprivileged_sender(rsyslog):
    realpeers.require("logger", "setpriv")
    realpeers.require_root()
    argv = realpeers.as_user("uucp", ["logger", "-u", str(rsyslog.socket),
                                      "-t", "uucptag", "from uucp"])
    subprocess.run(argv, check=True, timeout=10)
    assert "uucptag" in rsyslog.wait_for("from uucp")


# -- smtp-sink and Postfix -----------------------------------------------------

def test_smtp_sink_records_envelope_and_message(smtp_sink):
    import smtplib
    with smtplib.SMTP("127.0.0.1", smtp_sink.port, timeout=10) as c:
        c.sendmail("a@example.org", ["x@example.net", "y@example.net"],
                   _message(b"direct").replace(b"\n", b"\r\n"))
    (dump,) = smtp_sink.wait_count(1, 10)
    assert dump.mail_from == "a@example.org"
    assert dump.rcpt_to == ["x@example.net", "y@example.net"]
    assert dump.client_addr == "127.0.0.1"
    assert dump.data == _message(b"direct")
    assert smtp_sink.messages() == [dump.data]


@pytest.mark.parametrize("user", [None, "uucp"])
def test_postfix_sendmail_reaches_sink_byte_identical(postfix, smtp_sink, user):
    if user:
        realpeers.require("setpriv")
    argv = postfix.sendmail_argv() + ["-bm", "-oi", "-f", "s@example.org",
                                      "--", "r1@example.net", "r2@example.net"]
    assert argv[:3] == ["/usr/sbin/sendmail", "-C", str(postfix.confdir)]
    if user:
        argv = realpeers.as_user(user, argv)
    msg = _message(b"via postfix")
    r = subprocess.run(argv, input=msg, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (dump,) = smtp_sink.wait_count(1, 30)
    assert dump.mail_from == "s@example.org"
    assert sorted(dump.rcpt_to) == ["r1@example.net", "r2@example.net"]
    assert dump.body == TRICKY_BODY
    # what Postfix adds: Received first, Message-Id and Date appended
    assert dump.data.startswith(b"Received: by ")
    assert len(dump.header("Message-Id")) == 1
    assert len(dump.header("Date")) == 1
    assert dump.header("From") == [b"sender@example.org"]
    assert dump.header("Subject") == [b"via postfix"]
    uid = b"10" if user == "uucp" else b"0"
    assert b"from userid " + uid + b")" in dump.header("Received")[0]
    realpeers.wait_until(lambda: "status=sent" in postfix.maillog(), 10)


def test_postfix_multi_megabyte_message_identical(postfix, smtp_sink):
    body = b"".join(b"%07d \xe9\xe8 .\n.\n..\n" % i for i in range(200000))
    assert len(body) > 3_000_000
    r = postfix.sendmail(_message(b"big", body), "s@example.org",
                         ["r@example.net"], user="uucp")
    assert r.returncode == 0, r.stderr
    (dump,) = smtp_sink.wait_count(1, 60)
    assert dump.body == body
    postfix.wait_queue_empty(10)


def test_postfix_alternate_config_directory_registered_and_removed(tmp_path, smtp_sink):
    realpeers.require_root()
    get = ["postconf", "-h", "alternate_config_directories"]
    pf = realpeers.Postfix(tmp_path / "pf2", smtp_sink.port)
    try:
        assert str(pf.confdir) in subprocess.run(get, capture_output=True,
                                                 text=True).stdout
        assert not realpeers.listening("127.0.0.1", 25)
    finally:
        pf.stop()
    assert str(pf.confdir) not in subprocess.run(get, capture_output=True,
                                                 text=True).stdout
    # unlisted: a non-root sendmail -C is refused
    r = subprocess.run(realpeers.as_user("uucp", pf.sendmail_argv() + [
        "-bm", "-oi", "-f", "a@b", "--", "c@d"]), input=b"x\n",
        capture_output=True, timeout=30)
    assert r.returncode == 75
    assert b"unauthorized configuration directory" in r.stderr


# -- Dovecot and fetchmail -------------------------------------------------------

def test_dovecot_apop_retr_byte_identical(dovecot):
    msg = _message(b"pop")
    dovecot.deliver("alice", msg)
    pop = poplib.POP3("127.0.0.1", dovecot.port, timeout=10)
    try:
        assert re.search(rb"<[^<>]+@[^<>]+>$", pop.getwelcome())
        assert pop.apop("alice", "alicesecret").startswith(b"+OK")
        assert pop.stat() == (1, len(msg.replace(b"\n", b"\r\n")))  # octets as sent
        _, lines, _ = pop.retr(1)
    finally:
        pop.quit()
    assert b"\n".join(lines) + b"\n" == msg


def test_dovecot_rejects_wrong_secret(dovecot):
    pop = poplib.POP3("127.0.0.1", dovecot.port, timeout=10)
    try:
        with pytest.raises(poplib.error_proto, match="Authentication failed"):
            pop.apop("alice", "wrong")
    finally:
        pop.close()


def test_two_dovecots_at_once(tmp_path, dovecot):
    other = realpeers.Dovecot(tmp_path / "dovecot2", users={"bob": "bobsecret"},
                              listen="127.0.0.2")
    try:
        other.deliver("bob", b"Subject: bob\n\nfor bob\n")
        pop = poplib.POP3("127.0.0.2", other.port, timeout=10)
        pop.apop("bob", "bobsecret")
        assert pop.stat()[0] == 1
        pop.quit()
        pop = poplib.POP3("127.0.0.1", dovecot.port, timeout=10)
        pop.apop("alice", "alicesecret")
        assert pop.stat()[0] == 0
        pop.quit()
    finally:
        other.stop()
    assert not realpeers.listening("127.0.0.2", other.port)


def test_fetchmail_apop_fetches_from_dovecot(tmp_path, dovecot):
    first, second = _message(b"one"), _message(b"two", b"short\n")
    dovecot.deliver("alice", first)
    dovecot.deliver("alice", second)
    rc, msgs = realpeers.fetchmail_apop(tmp_path, "127.0.0.1", dovecot.port,
                                        "alice", "alicesecret")
    assert rc == 0
    assert msgs == [first, second]
    # keep: a second run fetches them again
    rc, msgs = realpeers.fetchmail_apop(tmp_path, "127.0.0.1", dovecot.port,
                                        "alice", "alicesecret")
    assert (rc, len(msgs)) == (0, 2)
    rc, msgs = realpeers.fetchmail_apop(tmp_path, "127.0.0.1", dovecot.port,
                                        "alice", "wrong")
    assert (rc, msgs) == (3, [])


# -- inetd-style launchers ---------------------------------------------------------

def _echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


def test_xinetd_runs_cat_per_connection(tmp_path):
    realpeers.require_root()
    port = realpeers.free_port()
    service = realpeers.Xinetd.service("mw-echo", port, "/bin/cat", user="nobody")
    with realpeers.Xinetd(tmp_path / "xinetd", service) as xi:
        assert _echo(port, b"hello\n.\n") == b"hello\n.\n"
        assert _echo(port, b"again\n") == b"again\n"
        realpeers.wait_until(lambda: xi.read_log().count("START: mw-echo") == 2, 5)
        pid = xi.proc.pid
    assert _pid_gone(pid) and not realpeers.listening("127.0.0.1", port)


def test_tcpserver_runs_program_with_remote_ip(tmp_path):
    realpeers.require_root()
    with realpeers.Tcpserver(tmp_path / "tcpserver",
                             ["/bin/sh", "-c", "echo $TCPREMOTEIP; cat"],
                             user="nobody") as ts:
        assert _echo(ts.port, b"hi\n") == b"127.0.0.1\nhi\n"
        port = ts.port
    assert not realpeers.listening("127.0.0.1", port)
