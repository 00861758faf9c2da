"""smapd to a real Postfix smtpd mail hub with STARTTLS, at every
`mailhub-tls` level (REAL-PEERS.md "Postfix smtpd with STARTTLS").

One Postfix for the module, with an smtpd per port: the good certificate
(SANs localhost, 127.0.0.1), one for another name, one from another CA,
and one without TLS.  It relays to an smtp-sink, where the Received: line
Postfix wrote says whether the hop from smapd was encrypted (`with ESMTPS`,
`using TLSv1.3`).  A hub that cannot meet the level leaves the message
queued with the reason in its state and in the `deferred` log line.
"""

import os
import re
import time

import pytest

from common import spool
from smapd import state
from tests.integration import realpeers, tlspeers
from tests.integration import smapd_helpers as helpers

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nTo: {rcpt}\r\nSubject: tls\r\n\r\nover TLS\r\n"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    realpeers.require("postfix", "postconf", "smtp-sink", "openssl")
    realpeers.require_root()
    base = tmp_path_factory.mktemp("tlshub")
    ca = tlspeers.TestCA(base / "ca")
    other = tlspeers.TestCA(base / "other-ca", name="other")
    realpeers.open_up(base / "ca")
    ports = {"good": ca.leaf("hub"),
             "wrong": ca.leaf("hub-wrong", sans=("DNS:other.example.test",),
                              cn="other.example.test"),
             "other": other.leaf("hub-other"),
             "plain": None}
    with tlspeers.PostfixHub(base / "peer", ports) as peer:
        peer.ca = ca
        yield peer


def deliver(tmp_path, hub, rsyslog, port_label, level, rcpt, extra=(), host="127.0.0.1"):
    """Spool one message and run smapd --once against hub's port; returns
    (message id, spool directory, log text)."""
    directory = helpers.make_spool(tmp_path / "spool")
    lines = ["smapd: mailhub %s:%d" % (host, hub.ports[port_label]),
             "smapd: mailhub-tls %s" % level, "smapd: retry 1", *extra]
    table = helpers.write_table(tmp_path / "table", directory, logsocket=rsyslog.socket,
                                sendmail=["/bin/false"], lines=lines)
    message_id = helpers.spool_message(directory, "a@example.net", [rcpt],
                                       MESSAGE.replace(b"{rcpt}", rcpt.encode()))
    result = helpers.run_once(table)
    assert result.returncode == 0, result.stderr
    rsyslog.wait_for(re.compile(r"(delivered|deferred) id=%s" % message_id))
    return message_id, directory, rsyslog.read()


def arrived(hub, rcpt):
    """The message for rcpt at the sink behind Postfix, and Postfix's
    Received: line about the hop from smapd."""
    def found():
        return [d for d in hub.sink.dumps() if rcpt in d.rcpt_to]
    [dump] = realpeers.wait_until(found, 30, what="message for %s at the sink" % rcpt)
    received = b" ".join(dump.header("Received")[0].split())
    return dump, received


def line_of(log, message_id, event):
    return next(line for line in log.splitlines() if "%s id=%s" % (event, message_id) in line)


def test_may_encrypts_with_a_hub_that_offers_starttls(tmp_path, hub, rsyslog):
    message_id, directory, log = deliver(tmp_path, hub, rsyslog, "good", "may",
                                         "may-good@example.org")
    dump, received = arrived(hub, "may-good@example.org")
    assert b"with ESMTPS" in received and b"using TLSv1.3" in received
    line = line_of(log, message_id, "delivered")
    assert "via=mailhub" in line and "tls=TLSv1.3" in line and "cipher=TLS_" in line
    assert spool.queued(str(directory)) == []


def test_may_sends_in_clear_to_a_hub_without_starttls(tmp_path, hub, rsyslog):
    message_id, _, log = deliver(tmp_path, hub, rsyslog, "plain", "may", "may-plain@example.org")
    _, received = arrived(hub, "may-plain@example.org")
    assert b"with ESMTP " in received + b" " and b"ESMTPS" not in received
    assert "tls=none" in line_of(log, message_id, "delivered")


def test_none_never_sends_starttls(tmp_path, hub, rsyslog):
    message_id, _, log = deliver(tmp_path, hub, rsyslog, "good", "none", "none@example.org")
    _, received = arrived(hub, "none@example.org")
    assert b"ESMTPS" not in received
    assert "tls=" not in line_of(log, message_id, "delivered")


def test_encrypt_takes_a_certificate_for_another_name(tmp_path, hub, rsyslog):
    message_id, _, log = deliver(tmp_path, hub, rsyslog, "wrong", "encrypt",
                                 "encrypt-wrong@example.org")
    _, received = arrived(hub, "encrypt-wrong@example.org")
    assert b"with ESMTPS" in received
    assert "tls=TLSv1.3" in line_of(log, message_id, "delivered")


def test_encrypt_defers_rather_than_send_in_clear(tmp_path, hub, rsyslog):
    message_id, directory, log = deliver(tmp_path, hub, rsyslog, "plain", "encrypt",
                                         "encrypt-plain@example.org")
    assert spool.queued(str(directory)) == [message_id]
    record = state.load(str(directory), message_id)
    assert record.attempts == 1 and "did not offer STARTTLS" in record.last_error
    line = line_of(log, message_id, "deferred")
    assert 'tls_error="STARTTLS not offered"' in line
    time.sleep(0.5)
    assert not [d for d in hub.sink.dumps() if "encrypt-plain@example.org" in d.rcpt_to]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_verify_delivers_to_a_hub_whose_certificate_names_it(tmp_path, hub, rsyslog, host):
    rcpt = "verify-%s@example.org" % host.replace(".", "-")
    message_id, _, log = deliver(tmp_path, hub, rsyslog, "good", "verify", rcpt,
                                 extra=["smapd: mailhub-ca %s" % hub.ca.root], host=host)
    _, received = arrived(hub, rcpt)
    assert b"with ESMTPS" in received
    assert "tls=TLSv1.3" in line_of(log, message_id, "delivered")


@pytest.mark.parametrize("label, reason", [
    ("wrong", "IP address mismatch"),
    ("other", "unable to get local issuer certificate"),
    ("plain", "STARTTLS not offered"),
])
def test_verify_defers_for_a_wrong_certificate(tmp_path, hub, rsyslog, label, reason):
    rcpt = "verify-%s@example.org" % label
    message_id, directory, log = deliver(tmp_path, hub, rsyslog, label, "verify", rcpt,
                                         extra=["smapd: mailhub-ca %s" % hub.ca.root])
    assert spool.queued(str(directory)) == [message_id]
    record = state.load(str(directory), message_id)
    assert record.attempts == 1
    line = line_of(log, message_id, "deferred")
    assert "tls_error=" in line and reason in line
    time.sleep(0.5)
    assert not [d for d in hub.sink.dumps() if rcpt in d.rcpt_to]


def test_verify_against_the_system_store_refuses_a_private_ca(tmp_path, hub, rsyslog):
    message_id, directory, log = deliver(tmp_path, hub, rsyslog, "good", "verify",
                                         "verify-system@example.org")
    assert spool.queued(str(directory)) == [message_id]
    assert "certificate verify failed" in line_of(log, message_id, "deferred")


def test_the_hub_logged_each_tls_session(hub):
    log = hub.maillog()
    assert "TLS connection established from" in log
    assert os.path.exists(hub.ca.root)
