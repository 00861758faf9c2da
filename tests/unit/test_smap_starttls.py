"""smap's STARTTLS (RFC 3207) as a state machine, through the real
common.conversation loop with scripted transports (no sockets, no ssl).

The attacks: commands pipelined after STARTTLS in the same packet (or
held in the transport's buffer) must never be executed, in the clear or
over TLS (CVE-2011-0411, the 2021 "NO STARTTLS" findings); a second
STARTTLS; STARTTLS with an argument or in the wrong state; a client that
never STARTTLSes while require-tls names it.  After the handshake the
session starts over: EHLO again, STARTTLS no longer offered."""

from common import conversation, lineio
from smap import session
from tests.unit import smap_fixtures
from tests.unit.test_conversation import FakeTransport

TLS_FIELDS = {"tls": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}


def tls_session(tmp_path, require_tls=False):
    smtp, log = smap_fixtures.make_session(tmp_path, greet=False)
    smtp.settings.starttls = True
    smtp.settings.require_tls = require_tls
    return smtp, log


def run(smtp, plain_reads, tls_reads=(), buffered=0):
    """The conversation over a plain transport that switches to a second
    scripted one; (plain transport, tls transport or None, outcome)."""
    plain = FakeTransport(plain_reads, buffered=buffered)
    secure = FakeTransport(tls_reads, name="tls")
    switched = []

    def switch(old):
        assert old is plain
        smtp.tls = dict(TLS_FIELDS)
        switched.append(secure)
        return secure
    dialogue = conversation.Conversation(plain, smtp, 30, switch=switch)
    outcome = dialogue.run()
    return plain, (switched[0] if switched else None), outcome


def text(transport):
    return b"".join(data for data, _ in transport.written)


def test_ehlo_offers_starttls_only_when_configured(tmp_path):
    smtp, _ = smap_fixtures.make_session(tmp_path)
    assert b"STARTTLS" not in smtp.feed(b"EHLO client.example.net\r\n")
    assert smtp.feed(b"STARTTLS\r\n").startswith(b"502 ")
    smtp, _ = tls_session(tmp_path / "t")
    smtp.greeting()
    reply = smtp.feed(b"EHLO client.example.net\r\n")
    assert b"250-STARTTLS\r\n" in reply and reply.endswith(b"250 ENHANCEDSTATUSCODES\r\n")
    assert b"STARTTLS" not in smtp.feed(b"HELO client.example.net\r\n")


def test_starttls_then_session_starts_over(tmp_path):
    smtp, log = tls_session(tmp_path)
    plain, secure, outcome = run(
        smtp, [b"EHLO a.example.net\r\n", b"STARTTLS\r\n"],
        [b"MAIL FROM:<a@example.net>\r\n", b"EHLO a.example.net\r\n",
         b"MAIL FROM:<a@example.net>\r\n", b"RCPT TO:<u@example.org>\r\n", b"DATA\r\n",
         b"Subject: x\r\n\r\nhi\r\n.\r\n", b"STARTTLS\r\n", b"QUIT\r\n"])
    assert text(plain).endswith(b"220 2.0.0 Ready to start TLS\r\n")
    replies = text(secure).split(b"\r\n")
    assert replies[0].startswith(b"503 5.5.1")                 # EHLO again first (§4.2)
    assert b"250-STARTTLS" not in text(secure)                 # not offered again
    assert any(r.startswith(b"250 2.0.0 Ok: queued as") for r in replies)
    assert b"554 5.5.1 Error: TLS already active" in text(secure)
    assert outcome == conversation.CLOSED
    queued, _ = smap_fixtures.spooled(tmp_path)
    data = (tmp_path / "queue" / queued[0]).read_bytes()
    assert b"(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)" in data
    assert b"with ESMTPS id" in data
    message = [f for _, e, f in log.events if e == "message"][0]
    assert message["tls"] == "TLSv1.3" and message["cipher"] == "TLS_AES_256_GCM_SHA384"
    assert "second STARTTLS" in log.reasons()


def test_injection_in_the_same_packet_is_refused(tmp_path):
    smtp, log = tls_session(tmp_path)
    plain, secure, outcome = run(
        smtp, [b"EHLO a.example.net\r\n",
               b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<u@example.org>\r\n"],
        [b"EHLO a.example.net\r\n"])
    assert secure is None and outcome == conversation.SWITCH_REFUSED
    out = text(plain)
    assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n"
                        b"554 5.5.0 Error: input after STARTTLS before the TLS handshake\r\n")
    assert b"250 2.1.0" not in out                             # MAIL never executed
    assert smtp.envelope.sender is None and smtp.closed
    assert any("command injection" in r for r in log.reasons())


def test_injection_held_in_the_transport_buffer_is_refused(tmp_path):
    smtp, log = tls_session(tmp_path)
    plain, secure, outcome = run(smtp, [b"EHLO a.example.net\r\n", b"STARTTLS\r\n"],
                                 buffered=7)
    assert secure is None and outcome == conversation.SWITCH_REFUSED
    assert text(plain).endswith(b"554 5.5.0 Error: input after STARTTLS before the TLS"
                                b" handshake\r\n")


def test_starttls_argument_state_and_transaction(tmp_path):
    smtp, log = tls_session(tmp_path)
    smtp.greeting()
    assert smtp.feed(b"STARTTLS\r\n").startswith(b"503 5.5.1 Error: send EHLO first")
    smtp.feed(b"EHLO a.example.net\r\n")
    assert smtp.feed(b"STARTTLS now\r\n").startswith(b"501 5.5.4")
    smtp.feed(b"MAIL FROM:<a@example.net>\r\n")
    assert smtp.feed(b"STARTTLS\r\n").startswith(b"503 5.5.1 Error: MAIL transaction")
    assert smtp.switch_request is None


def test_failed_handshake_ends_the_session(tmp_path):
    smtp, log = tls_session(tmp_path)
    plain = FakeTransport([b"EHLO a.example.net\r\n", b"STARTTLS\r\n"])

    def switch(old):
        raise lineio.Closed()
    outcome = conversation.Conversation(plain, smtp, 30, switch=switch).run()
    assert outcome == conversation.SWITCH_FAILED and smtp.closed and smtp.tls is None


def test_require_tls_refuses_mail_in_the_clear(tmp_path):
    smtp, log = tls_session(tmp_path, require_tls=True)
    plain, secure, outcome = run(
        smtp, [b"EHLO a.example.net\r\n", b"MAIL FROM:<a@example.net>\r\n", b"STARTTLS\r\n"],
        [b"EHLO a.example.net\r\n", b"MAIL FROM:<a@example.net>\r\n", b"QUIT\r\n"])
    assert b"530 5.7.0 Must issue a STARTTLS command first\r\n" in text(plain)
    assert b"250 2.1.0 Ok\r\n" in text(secure)
    assert "MAIL before STARTTLS (require-tls)" in log.reasons()


def test_require_tls_is_never_the_default(tmp_path):
    smtp, _ = tls_session(tmp_path)
    assert session.Settings("mx.example.org").require_tls is False
    smtp.greeting()
    smtp.feed(b"EHLO a.example.net\r\n")
    assert smtp.feed(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
