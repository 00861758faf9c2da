"""pop3-gw's STLS (RFC 2595) and require-tls as a state machine, through the
real common.conversation loop with scripted transports (no sockets).

The attacks: `STLS\\r\\nUSER x` (or APOP) in one packet must never be
executed, in the clear or over TLS; a second STLS; APOP or USER in the
clear under `require-tls yes`; a password in the clear where the gateway
has a certificate (USER/PASS only inside TLS)."""

from common import conversation
from pop3gw import session
from tests.unit.test_conversation import FakeTransport
from tests.unit.test_pop3_session import apop_line, make

TLS_FIELDS = {"tls": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"}


def tls_make(require_tls=False, userpass=False, tls_configured=True):
    pop, log, reports = make(userpass=userpass)
    pop.settings.tls_configured = tls_configured
    pop.settings.require_tls = require_tls
    pop.stls = True
    return pop, log, reports


def run(pop, plain_reads, tls_reads=(), buffered=0):
    plain = FakeTransport(plain_reads, buffered=buffered)
    secure = FakeTransport(tls_reads, name="tls")
    switched = []

    def switch(old):
        pop.tls = dict(TLS_FIELDS)
        switched.append(secure)
        return secure
    outcome = conversation.Conversation(plain, pop, 30, switch=switch).run(
        until=lambda: pop.login is not None)
    return plain, (switched[0] if switched else None), outcome


def text(transport):
    return b"".join(data for data, _ in transport.written)


def test_capa_offers_stls_before_and_user_only_inside_tls():
    pop, _, _ = tls_make(userpass=True)
    plain, secure, _ = run(pop, [b"CAPA\r\n", b"STLS\r\n"], [b"CAPA\r\n", b"QUIT\r\n"])
    before = text(plain)
    assert b"\r\nSTLS\r\n" in before and b"\r\nUSER\r\n" not in before
    assert before.endswith(b"+OK Begin TLS negotiation\r\n")
    after = text(secure)
    assert b"STLS" not in after and b"\r\nUSER\r\n" in after


def test_no_stls_without_a_certificate():
    pop, _, _ = make()
    assert b"STLS" not in pop.feed(b"CAPA\r\n")
    assert pop.feed(b"STLS\r\n").startswith(b"-ERR")


def test_injection_after_stls_is_refused_never_executed():
    pop, log, reports = tls_make(userpass=True)
    plain, secure, outcome = run(pop, [b"STLS\r\nUSER alice\r\nPASS alicesecret\r\n"],
                                 [b"CAPA\r\n"])
    assert secure is None and outcome == conversation.SWITCH_REFUSED
    assert text(plain) == (b"+OK mailwall pop3-gw ready <1.2.abc@gw.test>\r\n"
                           b"+OK Begin TLS negotiation\r\n"
                           b"-ERR input after STLS before the TLS handshake\r\n")
    assert pop.pending_user is None and pop.login is None and reports == []
    assert any("command injection" in (f.get("reason") or "") for _, f in log.events)


def test_injection_of_apop_after_stls_is_refused():
    pop, _, reports = tls_make()
    plain, secure, outcome = run(pop, [b"STLS\r\n" + apop_line("alice")])
    assert outcome == conversation.SWITCH_REFUSED and pop.login is None and reports == []


def test_injection_held_in_the_transport_buffer_is_refused():
    pop, _, _ = tls_make()
    plain, secure, outcome = run(pop, [b"STLS\r\n"], buffered=5)
    assert secure is None and outcome == conversation.SWITCH_REFUSED


def test_second_stls_and_argument():
    pop, log, _ = tls_make()
    assert pop.feed(b"STLS now\r\n") == b"-ERR usage: STLS\r\n"
    plain, secure, _ = run(pop, [b"STLS\r\n"], [b"STLS\r\n", b"QUIT\r\n"])
    assert text(secure).startswith(b"-ERR TLS already active\r\n")


def test_require_tls_refuses_apop_and_user_in_the_clear():
    pop, log, reports = tls_make(require_tls=True, userpass=True)
    assert pop.feed(apop_line("alice")).startswith(b"-ERR [AUTH] TLS required")
    assert pop.feed(b"USER alice\r\n").startswith(b"-ERR [AUTH] TLS required")
    assert reports == [] and pop.login is None
    plain, secure, outcome = run(pop, [b"STLS\r\n"], [apop_line("alice")])
    assert outcome == conversation.DONE and pop.login.user == "alice"


def test_userpass_only_inside_tls_when_a_certificate_is_configured():
    pop, _, _ = tls_make(userpass=True)
    assert pop.feed(b"USER alice\r\n") == b"-ERR [AUTH] TLS required: send STLS first\r\n"
    assert pop.feed(b"PASS alicesecret\r\n").startswith(b"-ERR")
    plain, secure, outcome = run(pop, [b"STLS\r\n"],
                                 [b"USER alice\r\n", b"PASS alicesecret\r\n"])
    assert outcome == conversation.DONE and pop.login.user == "alice"


def test_userpass_without_tls_configured_keeps_its_old_meaning():
    pop, _, _ = make(userpass=True)
    assert b"\r\nUSER\r\n" in pop.feed(b"CAPA\r\n")
    assert pop.feed(b"USER alice\r\n") == b"+OK send PASS\r\n"


def test_implicit_tls_session_starts_inside_tls():
    pop, _, _ = make(userpass=True)
    pop.settings.tls_configured = True
    pop.tls = dict(TLS_FIELDS)
    reply = pop.feed(b"CAPA\r\n")
    assert b"STLS" not in reply and b"\r\nUSER\r\n" in reply
    assert session.Settings().require_tls is False
