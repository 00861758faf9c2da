"""smap with real milters (issue 15): clamav-milter, rspamd's proxy, opendkim.

Debian's packages with private configurations on loopback, no network
(tests/integration/milterpeers.py, the recipes of REAL-PEERS.md).  The
slow peers start once for the module.  smap runs in inetd mode (a
socketpair on fd 0/1) and, for the unix: socket outside the spool that
the jailed process cannot reach itself, in --daemon mode.
"""

import base64

import pytest

from tests.integration import milterpeers
from tests.security.harness import SmapSetup, queue_id_of, send_message
from tests.security.hostile_milter import HostileMilter, pkt

CLEAN = b"From: a@example.net\r\nTo: user@example.com\r\nSubject: clean\r\n\r\nJust text.\r\n"


def infected_attachment():
    return (b"From: a@example.net\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            b"Content-Type: text/plain\r\n\r\nSee attached.\r\n--XX\r\n"
            b"Content-Type: application/octet-stream; name=a.com\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" +
            base64.encodebytes(milterpeers.EICAR).replace(b"\n", b"\r\n") + b"--XX--\r\n")


@pytest.fixture(scope="module")
def clamav():
    with milterpeers.ClamAV() as peer:
        yield peer


@pytest.fixture(scope="module")
def rspamd():
    with milterpeers.Rspamd() as peer:
        yield peer


@pytest.fixture(scope="module")
def opendkim():
    with milterpeers.OpenDKIM() as peer:
        yield peer


@pytest.fixture
def smap_with(tmp_path):
    made = []

    def start(*specs, lines=()):
        setup = SmapSetup(tmp_path / ("s%d" % len(made)),
                          ["smap: milters %s" % " ".join(specs)] + list(lines))
        made.append(setup)
        return setup
    yield start
    for setup in made:
        setup.stop()


def deliver(setup, body, client=None):
    client = client or setup.inetd(timeout=30)
    code, text = send_message(client, "a@example.net", ["user@example.com"], body)
    client.cmd("QUIT")
    return code, text


def header_of(setup, code, text):
    assert code == 250, text
    _, data = setup.message(queue_id_of(text))
    return data.split(b"\r\n\r\n", 1)[0]


def test_clamav_rejects_eicar_and_accepts_clean_mail(clamav, smap_with):
    setup = smap_with(clamav.spec)
    code, text = deliver(setup, b"Subject: test\r\n\r\n" + milterpeers.EICAR + b"\r\n")
    assert code == 550 and "Local.Test.EICAR" in text
    assert setup.queued() == [] and setup.tmp_files() == []
    line = setup.logs.wait_for("verdict=reject")
    assert "milter=%s" % clamav.spec in line and "stage=eom" in line
    code, text = deliver(setup, infected_attachment())
    assert code == 550
    header = header_of(setup, *deliver(setup, CLEAN))
    assert b"\r\nX-Virus-Status: Clean" in header and b"X-Virus-Scanned: clamav-milter" in header
    assert len(setup.queued()) == 1


def test_rspamd_rejects_gtube_and_adds_its_headers(rspamd, smap_with):
    setup = smap_with(rspamd.spec)
    code, text = deliver(setup, CLEAN.replace(b"Just text.", milterpeers.GTUBE))
    assert (code, text) == (554, "554 5.7.1 Gtube pattern")
    assert setup.queued() == []
    header = header_of(setup, *deliver(setup, CLEAN))
    assert b"\r\nX-Spamd-Result: default: False" in header
    assert b"\r\nX-Rspamd-Server: " in header
    queue_id = setup.queued()[0]
    assert b"X-Rspamd-Queue-Id: %s" % queue_id.encode() in header     # the {i} macro


def test_opendkim_adds_authentication_results(opendkim, smap_with):
    setup = smap_with(opendkim.spec)
    fields = [("From", "a@outside.test"), ("To", "user@example.com"),
              ("Subject", "signed at test time"), ("Date", "Wed, 02 Dec 2026 10:00:00 +0000")]
    body = b"A signed message.\r\nSecond line.\r\n"
    signature = opendkim.sign(fields, body)
    message = ("DKIM-Signature: %s\r\n" % signature).encode() + b"".join(
        ("%s: %s\r\n" % field).encode() for field in fields) + b"\r\n" + body
    header = header_of(setup, *deliver(setup, message))
    assert header.startswith(b"Authentication-Results: gw.test;\r\n\tdkim=pass ")
    assert b"header.d=outside.test" in header
    header = header_of(setup, *deliver(setup, message.replace(b"Second", b"Changed")))
    assert b'dkim=fail reason="signature verification failed"' in header


def test_milters_in_order_clamav_then_rspamd(clamav, rspamd, smap_with):
    setup = smap_with(clamav.spec, rspamd.spec)
    header = header_of(setup, *deliver(setup, CLEAN))
    assert header.index(b"X-Virus-Status") < header.index(b"X-Spamd-Result")
    code, _ = deliver(setup, b"Subject: t\r\n\r\n" + milterpeers.EICAR + b"\r\n")
    assert code == 550          # the first milter decides; rspamd is not asked
    code, _ = deliver(setup, CLEAN.replace(b"Just text.", milterpeers.GTUBE))
    assert code == 554


def test_daemon_mode_reaches_a_unix_socket_outside_the_spool(smap_with, tmp_path):
    """--daemon: the jailed worker gets the connected socket from its helper,
    for connection after connection (maxuse 5)."""
    clam = milterpeers.ClamAV(unix_socket=True)
    try:
        setup = smap_with(clam.spec, lines=["smap: maxuse 5", "smap: maxchildren 2"])
        proc, port = setup.daemon()
        for _ in range(3):
            header = header_of(setup, *deliver(setup, CLEAN, setup.connect(port)))
            assert b"X-Virus-Status: Clean" in header
            code, text = deliver(setup, b"Subject: t\r\n\r\n" + milterpeers.EICAR + b"\r\n",
                                 setup.connect(port))
            assert code == 550, text
        assert len(setup.queued()) == 3
    finally:
        clam.stop()


def test_daemon_mode_with_a_stand_in_on_a_unix_socket(smap_with):
    directory = milterpeers._private_dir("mwstand-", "root")
    milter = HostileMilter({b"E": pkt(b"h", b"X-Stand-In\0seen\0") + pkt(b"a")},
                           unix_path=directory / "m.sock")
    try:
        setup = smap_with(milter.spec, lines=["smap: maxuse 3"])
        proc, port = setup.daemon()
        for _ in range(2):
            header = header_of(setup, *deliver(setup, CLEAN, setup.connect(port)))
            assert header.endswith(b"X-Stand-In: seen")
    finally:
        milter.close()


def test_inetd_mode_reaches_a_unix_socket(smap_with):
    clam = milterpeers.ClamAV(unix_socket=True)
    try:
        setup = smap_with(clam.spec)
        assert b"X-Virus-Status: Clean" in header_of(setup, *deliver(setup, CLEAN))
    finally:
        clam.stop()
