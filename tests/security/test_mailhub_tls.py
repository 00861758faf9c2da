"""Hostile mail hubs against smapd's `mailhub-tls` (smapd.agent.deliver_hub).

A stand-in hub on 127.0.0.1 that a network attacker controls: it strips
STARTTLS from its EHLO reply (the downgrade attack), answers STARTTLS with
454, sends plaintext behind its 220 (the STARTTLS injection class), breaks
the handshake, or shows a certificate for another name.  At `encrypt` and
`verify` none of these may make smapd send the message in clear: the
outcome is temporary, the message stays queued, no MAIL command reaches
the stand-in, and the log fields say why.  At `may` the Postfix meanings
hold (clear when not offered or refused; a failed handshake defers, and
only a message that has waited goes in clear on a new connection).
"""

import os
import socket
import ssl
import threading

import pytest

from common import tls
from smapd import agent
from tests.integration import realpeers, tlspeers

MESSAGE = b"From: a@example.net\r\nTo: bob@example.org\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    realpeers.require("openssl")
    directory = tmp_path_factory.mktemp("hubca")
    os.chmod(directory, 0o755)
    authority = tlspeers.TestCA(directory)
    authority.good = authority.leaf("hub")
    authority.wrong = authority.leaf("hub-wrong", sans=("DNS:other.example.test",),
                                     cn="other.example.test")
    return authority


class StandIn:
    """A scripted SMTP hub: `mode` says how it treats STARTTLS.  Records
    every command line of every connection (in clear and inside TLS)."""

    def __init__(self, mode, context=None, connections=2):
        self.mode, self.context = mode, context
        self.commands = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.connections = connections
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        for number in range(self.connections):
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.out = sock
            try:
                self.session(sock, number)
            except (OSError, ssl.SSLError):
                pass
            finally:
                self.out.close()
                sock.close()

    def session(self, sock, number):
        sock.settimeout(10)
        reader = sock.makefile("rb")
        out = sock
        sock.sendall(b"220 hub.example.test ESMTP\r\n")
        in_tls = False
        while True:
            line = reader.readline(1000)
            if not line:
                return
            command = line.strip().decode("ascii", "replace")
            self.commands.append((number, in_tls, command))
            verb = command.split(" ")[0].upper()
            if verb == "EHLO":
                offer = self.mode != "strip" and not in_tls
                out.sendall(b"250-hub.example.test\r\n250-8BITMIME\r\n" +
                            (b"250-STARTTLS\r\n" if offer else b"") + b"250 PIPELINING\r\n")
            elif verb == "STARTTLS":
                if self.mode == "454":
                    out.sendall(b"454 4.7.0 TLS not available due to local problem\r\n")
                    continue
                if self.mode == "inject":
                    out.sendall(b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 fake\r\n")
                    return
                out.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                if self.mode == "garbage":
                    sock.recv(4096)
                    sock.sendall(b"this is no TLS\r\n" * 10)
                    return
                out = self.out = self.context.wrap_socket(sock, server_side=True)
                reader = out.makefile("rb")
                in_tls = True
            elif verb == "MAIL" or verb == "RCPT":
                out.sendall(b"250 2.1.0 Ok\r\n")
            elif verb == "DATA":
                out.sendall(b"354 go\r\n")
                while reader.readline(100000) not in (b".\r\n", b""):
                    pass
                self.commands.append((number, in_tls, "<message>"))
                out.sendall(b"250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                out.sendall(b"221 bye\r\n")
                return
            else:
                out.sendall(b"250 ok\r\n")

    def clear_mail(self):
        """Commands of the transaction that went in clear."""
        return [c.split(":")[0].upper() for _, in_tls, c in self.commands
                if not in_tls and (c.upper().startswith("MAIL") or c == "<message>")]

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)     # wakes a waiting accept()
        except OSError:
            pass
        self.listener.close()
        self.thread.join(5)


def deliver(hub, level, cafile=None, retry=False):
    fields = {}
    hub_tls = agent.HubTLS(level, cafile)
    outcomes = agent.deliver_hub(("127.0.0.1", hub.port), "gw.example.org", "a@example.net",
                                 ["bob@example.org"], MESSAGE, 10, hub_tls, fields, retry)
    return outcomes, fields


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_a_hub_that_strips_starttls_gets_nothing_in_clear(ca, level):
    hub = StandIn("strip")
    try:
        outcomes, fields = deliver(hub, level, str(ca.root))
    finally:
        hub.close()
    [(_, kind, text)] = outcomes
    assert kind == "temp" and "did not offer STARTTLS" in text
    assert fields["tls_error"] == "STARTTLS not offered"
    assert hub.clear_mail() == []


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_a_hub_that_answers_starttls_with_454_gets_nothing_in_clear(ca, level):
    hub = StandIn("454")
    try:
        outcomes, fields = deliver(hub, level, str(ca.root))
    finally:
        hub.close()
    [(_, kind, text)] = outcomes
    assert kind == "temp" and "refused STARTTLS: 454" in text
    assert fields["tls_error"] == "STARTTLS refused: 454"
    assert hub.clear_mail() == []


@pytest.mark.parametrize("level", ["may", "encrypt", "verify"])
def test_plaintext_behind_the_220_is_never_read_as_the_hub_s_reply(ca, level):
    hub = StandIn("inject")
    try:
        outcomes, fields = deliver(hub, level, str(ca.root))
    finally:
        hub.close()
    [(_, kind, _)] = outcomes
    assert kind == "temp"
    assert fields["tls_error"] == "plaintext after 220 to STARTTLS"
    assert hub.clear_mail() == []


def test_at_may_not_offered_or_refused_goes_in_clear_as_postfix_does():
    for mode in ("strip", "454"):
        hub = StandIn(mode)
        try:
            outcomes, fields = deliver(hub, "may")
        finally:
            hub.close()
        assert [kind for _, kind, _ in outcomes] == ["ok"], (mode, outcomes)
        assert fields == {"tls": "none"}
        assert hub.clear_mail() == ["MAIL FROM", "<MESSAGE>"]


def test_at_may_a_failed_handshake_defers_first_and_goes_in_clear_after_retry(ca):
    hub = StandIn("garbage")
    try:
        outcomes, fields = deliver(hub, "may")
    finally:
        hub.close()
    assert [kind for _, kind, _ in outcomes] == ["temp"]
    assert "TLS handshake with the mail hub failed" in outcomes[0][2]
    assert fields["tls_error"] and hub.clear_mail() == []
    hub = StandIn("garbage")
    try:
        outcomes, fields = deliver(hub, "may", retry=True)
    finally:
        hub.close()
    assert [kind for _, kind, _ in outcomes] == ["ok"]
    assert fields["tls"] == "none" and fields["tls_fallback"]
    assert hub.clear_mail() == ["MAIL FROM", "<MESSAGE>"]
    # at encrypt a waited message still never goes in clear
    hub = StandIn("garbage")
    try:
        outcomes, fields = deliver(hub, "encrypt", retry=True)
    finally:
        hub.close()
    assert [kind for _, kind, _ in outcomes] == ["temp"] and hub.clear_mail() == []


def test_verify_refuses_a_certificate_for_another_name_and_encrypt_takes_it(ca):
    context = tls.server_context(str(ca.wrong[0]), str(ca.wrong[1]))
    hub = StandIn("tls", context)
    try:
        outcomes, fields = deliver(hub, "verify", str(ca.root))
    finally:
        hub.close()
    [(_, kind, text)] = outcomes
    assert kind == "temp" and "certificate verify failed" in text
    assert "IP address mismatch" in fields["tls_error"]
    assert [c for _, _, c in hub.commands if c.upper().startswith("MAIL")] == []
    hub = StandIn("tls", context)
    try:
        outcomes, fields = deliver(hub, "encrypt")
    finally:
        hub.close()
    assert [kind for _, kind, _ in outcomes] == ["ok"]
    assert fields["tls"] in ("TLSv1.2", "TLSv1.3") and fields["cipher"]
    assert hub.clear_mail() == []
    # the session started over inside TLS: a new EHLO before MAIL
    inside = [c.split(" ")[0].upper() for _, in_tls, c in hub.commands if in_tls]
    assert inside[:2] == ["EHLO", "MAIL"]


def test_verify_with_an_unusable_ca_file_defers_and_says_why(ca, tmp_path):
    open_ca = tmp_path / "ca.pem"
    open_ca.write_bytes(ca.root.read_bytes())
    os.chmod(open_ca, 0o666)
    hub = StandIn("tls", tls.server_context(str(ca.good[0]), str(ca.good[1])))
    try:
        outcomes, fields = deliver(hub, "verify", str(open_ca))
    finally:
        hub.close()
    [(_, kind, text)] = outcomes
    assert kind == "temp" and "writable by group or others" in text
    assert hub.clear_mail() == []
