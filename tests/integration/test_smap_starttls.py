"""smap STARTTLS (RFC 3207) with real peers: Python ssl as the client
(REAL-PEERS.md "Python ssl as a test client"), swaks --tls and `openssl
s_client -starttls smtp` against smap under inetd (tcpserver hands it the
socket on fd 0/1, as inetd does) and --daemon, with certificates made at
test time by a private CA (tlspeers.TestCA: the clients trust only its
root, so they also prove that smap sends its intermediate).

The attacks: STARTTLS and MAIL FROM in one packet (refused, never
executed, the log says why), a second STARTTLS, plaintext written under
the TLS layer after the handshake (ends the session: by construction
nothing but TLS records is read any more), a client that starts the
handshake and stalls (bounded by `timeout`).  Operations: SIGHUP gives new
--daemon connections the renewed certificate while a session in progress
goes on with the old one; `-n` names an unusable key; smap under inetd
without tls-cert does not import ssl."""

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration import realpeers, tlspeers
from tests.integration.smap_helpers import (InetdSmap, SmtpClient, contents, make_spool,
                                            send_message, smap_program, write_table)

pytestmark = pytest.mark.integration
QUEUED = re.compile(rb"250 2\.0\.0 Ok: queued as ([0-9A-F]+)")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    realpeers.require("openssl")
    realpeers.require_root()
    base = tmp_path_factory.mktemp("smap-pki")
    ca = tlspeers.TestCA(base / "ca")
    realpeers.open_up(base / "ca")
    ca.chain, ca.key = ca.leaf("smap")
    ca.chain2, ca.key2 = ca.leaf("smap-renewed")
    return ca


def tls_table(tmp_path, pki, *lines, logsocket=None, spool_dir=None):
    spool_dir = spool_dir or make_spool(tmp_path / "spool")
    return write_table(tmp_path / "table", spool_dir, "smap: tls-cert %s" % pki.chain,
                       "smap: tls-key %s" % pki.key, *lines, logsocket=logsocket), spool_dir


def client_context(pki):
    context = ssl.create_default_context(cafile=str(pki.root))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def starttls(client, pki, hostname="localhost"):
    """EHLO, STARTTLS, handshake; the SmtpClient now speaks over TLS."""
    assert client.reply().startswith(b"220 ")
    assert b"250-STARTTLS" in client.command(b"EHLO client.example.net\r\n")
    assert client.command(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    assert client.buffer == b""         # nothing else was sent before the handshake
    client.sock = client_context(pki).wrap_socket(client.sock, server_hostname=hostname)
    return client.sock


def serial_of(tls_socket):
    der = tls_socket.getpeercert(binary_form=True)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"],
                         input=der, capture_output=True, timeout=30, check=True)
    return out.stdout.strip()


def serial_of_file(path):
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-serial"],
                         capture_output=True, timeout=30, check=True)
    return out.stdout.strip()


def queued_file(spool_dir):
    queue, _ = contents(spool_dir)
    assert len(queue) == 1, queue
    return (Path(spool_dir) / "queue" / queue[0]).read_bytes()


# -- inetd mode (the socket on fd 0/1/2) ---------------------------------------

def test_inetd_starttls_message_received_esmtps(tmp_path, pki, rsyslog):
    table, spool_dir = tls_table(tmp_path, pki, logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        tls_socket = starttls(smap.client, pki)
        assert tls_socket.version() in ("TLSv1.2", "TLSv1.3")
        # RFC 3207 §4.2: the session starts over; STARTTLS no longer offered
        assert smap.client.command(b"MAIL FROM:<a@example.net>\r\n").startswith(b"503 ")
        reply = send_message(smap.client)
        assert QUEUED.match(reply), reply
        assert smap.client.command(b"STARTTLS\r\n") == \
            b"554 5.5.1 Error: TLS already active\r\n"
        assert smap.client.command(b"QUIT\r\n").startswith(b"221 ")
        assert smap.wait() == 0
    data = queued_file(spool_dir)
    assert re.search(rb"\(using TLSv1\.[23] with cipher [A-Z0-9_-]+\)\r\n\tby mx\.example\.org"
                     rb" \(mailwall smap\) with ESMTPS id ", data), data[:400]
    line = rsyslog.wait_for(re.compile(r"smap\[\d+\]: disconnect .*tls=TLSv1\.[23] cipher="))
    assert "messages=1" in line
    assert re.search(r"message id=\S+ .*tls=TLSv1\.[23] cipher=\S+", rsyslog.read())


def test_inetd_injection_after_starttls_is_refused_and_logged(tmp_path, pki, rsyslog):
    table, spool_dir = tls_table(tmp_path, pki, logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        client = smap.client
        client.reply()
        client.command(b"EHLO client.example.net\r\n")
        client.send(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<user@example.org>"
                    b"\r\nDATA\r\n")
        client.rest()
        assert smap.wait() == 0
    assert client.received.endswith(
        b"220 2.0.0 Ready to start TLS\r\n"
        b"554 5.5.0 Error: input after STARTTLS before the TLS handshake\r\n")
    assert b"250 2.1.0" not in client.received and client.only_smtp()
    assert contents(spool_dir) == ([], [])
    rsyslog.wait_for("input after STARTTLS before the TLS handshake (command injection)")


def test_plaintext_after_the_handshake_is_never_read_as_smtp(tmp_path, pki, rsyslog):
    table, spool_dir = tls_table(tmp_path, pki, logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        tls_socket = starttls(smap.client, pki)
        # under the TLS layer, on the bare socket: not a TLS record
        os.write(tls_socket.fileno(), b"MAIL FROM:<evil@example.net>\r\n")
        assert smap.wait() == 0
        # no SMTP reply comes back: the bytes were no TLS record
        try:
            answer = tls_socket.recv(100)
        except (ssl.SSLError, OSError):
            answer = b""
        assert answer == b""
    assert contents(spool_dir) == ([], [])
    rsyslog.wait_for(re.compile(r"smap\[\d+\]: disconnect .*tls=TLSv1"))
    assert "evil@example.net" not in rsyslog.read()


def test_handshake_is_bounded_by_timeout(tmp_path, pki, rsyslog):
    table, _ = tls_table(tmp_path, pki, "smap: timeout 2", logsocket=rsyslog.socket)
    with InetdSmap(table) as smap:
        smap.client.reply()
        smap.client.command(b"EHLO client.example.net\r\n")
        assert smap.client.command(b"STARTTLS\r\n").startswith(b"220 ")
        smap.client.send(b"\x16\x03\x01")       # the start of a ClientHello, then nothing
        started = time.monotonic()
        assert smap.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    rsyslog.wait_for(re.compile(r"tls-fail .*tls_error=\"?handshake timed out"))


def test_require_tls_530_before_starttls(tmp_path, pki):
    table, spool_dir = tls_table(tmp_path, pki, "smap: require-tls 127.0.0.0/8")
    with realpeers.Tcpserver(tmp_path / "tcpserver", [smap_program(), "-c", table]) as server:
        client = SmtpClient.connect("127.0.0.1", server.port)
        client.reply()
        client.command(b"EHLO client.example.net\r\n")
        assert client.command(b"MAIL FROM:<a@example.net>\r\n") == \
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        client.close()
        client = SmtpClient.connect("127.0.0.1", server.port)
        starttls(client, pki)
        assert QUEUED.match(send_message(client))
        client.close()


def test_swaks_tls_under_inetd(tmp_path, pki):
    realpeers.require("swaks", "tcpserver")
    table, spool_dir = tls_table(tmp_path, pki)
    with realpeers.Tcpserver(tmp_path / "tcpserver", [smap_program(), "-c", table]) as server:
        result = subprocess.run(
            ["swaks", "--server", "127.0.0.1:%d" % server.port, "--tls", "--tls-verify",
             "--tls-ca-path", str(pki.root), "--from", "a@example.net",
             "--to", "user@example.org", "--helo", "client.example.net"],
            capture_output=True, timeout=60)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "TLS started with cipher TLSv1." in out and "250 2.0.0 Ok: queued as" in out
    assert b"with ESMTPS id" in queued_file(spool_dir)


def test_no_ssl_imported_under_inetd_without_tls(tmp_path, pki):
    """The inetd path pays for ssl only when tls-cert is configured."""
    plain = write_table(tmp_path / "plain", make_spool(tmp_path / "spool-plain"))
    tls, _ = tls_table(tmp_path, pki, spool_dir=make_spool(tmp_path / "spool-tls"))
    found = {}
    for label, table in (("plain", plain), ("tls", tls)):
        server_end, client_end = socket.socketpair()
        read_fd, write_fd = os.pipe()
        code = ("import os, sys\nfrom smap import main\nmain.main(['-c', %r])\n"
                "os.write(%d, ' '.join(sorted(sys.modules)).encode())\n" % (table, write_fd))
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=server_end,
                                stdout=server_end, stderr=subprocess.DEVNULL,
                                pass_fds=[write_fd], env=dict(os.environ))
        server_end.close()
        os.close(write_fd)
        client = SmtpClient(client_end)
        client.reply()
        client.command(b"QUIT\r\n")
        proc.wait(timeout=30)
        with os.fdopen(read_fd, "rb") as modules:
            found[label] = set(modules.read().decode().split())
        client.close()
    assert "smap.session" in found["plain"]
    assert not {"ssl", "_ssl", "common.tls"} & found["plain"]
    assert {"ssl", "common.tls"} <= found["tls"]


def test_check_names_an_unusable_key(tmp_path, pki):
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(Path(pki.key).read_bytes())
    os.chmod(bad_key, 0o644)
    spool_dir = make_spool(tmp_path / "spool")
    table = write_table(tmp_path / "table", spool_dir, "smap: tls-cert %s" % pki.chain,
                        "smap: tls-key %s" % bad_key)
    result = subprocess.run([smap_program(), "-n", "-c", table], capture_output=True,
                            timeout=30)
    assert result.returncode == 1
    assert "%s: readable by group or others" % bad_key in result.stderr.decode()
    wrong = write_table(tmp_path / "wrong", spool_dir, "smap: tls-cert %s" % pki.chain,
                        "smap: tls-key %s" % pki.key2)
    result = subprocess.run([smap_program(), "-n", "-c", wrong], capture_output=True,
                            timeout=30)
    assert result.returncode == 1 and "does not match" in result.stderr.decode()


# -- --daemon ------------------------------------------------------------------------

class TLSDaemon:
    def __init__(self, tmp_path, table):
        self.port = realpeers.free_port()
        self.proc = realpeers.Proc(
            [smap_program(), "--daemon", "127.0.0.1:%d" % self.port, "-F", "-c", table],
            new_session=True, log=tmp_path / "smap.out")
        try:
            realpeers.wait_for_listen("127.0.0.1", self.port)
        except Exception:
            self.proc.stop()
            raise AssertionError("smap --daemon did not listen: %s" % self.proc.output())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stop()


def read_until(stream, wanted, timeout):
    """What `stream` (a pipe) gives until `wanted` has come, within timeout."""
    import select
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(left, 0))
        chunk = os.read(stream.fileno(), 4096) if ready else b""
        if not chunk:
            raise AssertionError("%r never came; got %r" % (wanted, seen[-2000:]))
        seen += chunk
    return seen


def test_daemon_openssl_s_client_and_swaks(tmp_path, pki):
    realpeers.require("swaks")
    table, spool_dir = tls_table(tmp_path, pki)
    with TLSDaemon(tmp_path, table) as daemon:
        # One line at a time, each after the reply to the one before: piped
        # all at once, s_client may send EHLO and QUIT in one record, which
        # smap rightly refuses as pipelining.
        client = subprocess.Popen(
            ["openssl", "s_client", "-starttls", "smtp", "-connect",
             "127.0.0.1:%d" % daemon.port, "-CAfile", str(pki.root), "-verify_return_error",
             "-verify_hostname", "localhost", "-brief", "-crlf"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            client.stdin.write(b"EHLO client.example.net\n")
            client.stdin.flush()
            ehlo = read_until(client.stdout, b"250 ENHANCEDSTATUSCODES", 30)
            # s_client takes a line starting with Q as its own command: quit
            rest, errors = client.communicate(b"QUIT\n", timeout=30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        stdout = (ehlo + rest).decode(errors="replace")
        text = stdout + errors.decode(errors="replace")
        assert client.returncode == 0, text
        assert "Verification: OK" in text and "Protocol version: TLSv1.3" in text
        assert "250 ENHANCEDSTATUSCODES" in stdout and "STARTTLS" not in stdout
        result = subprocess.run(
            ["swaks", "--server", "127.0.0.1:%d" % daemon.port, "--tls", "--tls-verify",
             "--tls-ca-path", str(pki.root), "--from", "a@example.net",
             "--to", "user@example.org"], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stdout.decode(errors="replace")
    assert b"with ESMTPS id" in queued_file(spool_dir)


def test_daemon_refuses_to_start_with_a_bad_key(tmp_path, pki):
    bad_key = tmp_path / "bad.key"
    bad_key.write_bytes(Path(pki.key).read_bytes())
    os.chmod(bad_key, 0o640)
    spool_dir = make_spool(tmp_path / "spool")
    table = write_table(tmp_path / "table", spool_dir, "smap: tls-cert %s" % pki.chain,
                        "smap: tls-key %s" % bad_key)
    result = subprocess.run([smap_program(), "--daemon", "127.0.0.1:%d" % realpeers.free_port(),
                             "-F", "-c", table], capture_output=True, timeout=30)
    assert result.returncode != 0 and str(bad_key) in result.stderr.decode()


def test_daemon_sighup_renews_the_certificate_without_dropping_a_session(tmp_path, pki):
    live = tmp_path / "live"
    live.mkdir(mode=0o755)
    chain, key = live / "chain.pem", live / "key.pem"
    chain.write_bytes(Path(pki.chain).read_bytes())
    key.write_bytes(Path(pki.key).read_bytes())
    os.chmod(key, 0o600)
    os.chmod(chain, 0o644)
    spool_dir = make_spool(tmp_path / "spool")
    table = write_table(tmp_path / "table", spool_dir, "smap: tls-cert %s" % chain,
                        "smap: tls-key %s" % key, "smap: maxuse 100")
    old_serial, new_serial = serial_of_file(pki.chain), serial_of_file(pki.chain2)
    with TLSDaemon(tmp_path, table) as daemon:
        ongoing = SmtpClient.connect("127.0.0.1", daemon.port)
        assert serial_of(starttls(ongoing, pki)) == old_serial
        assert ongoing.command(b"EHLO client.example.net\r\n").startswith(b"250")
        assert ongoing.command(b"MAIL FROM:<a@example.net>\r\n") == b"250 2.1.0 Ok\r\n"
        # renewed as an ACME client does: new files renamed over the old, key first
        for source, target in ((pki.key2, key), (pki.chain2, chain)):
            temporary = target.with_suffix(".new")
            temporary.write_bytes(Path(source).read_bytes())
            os.chmod(temporary, 0o600 if target == key else 0o644)
            os.rename(temporary, target)
        os.kill(daemon.proc.pid, signal.SIGHUP)

        def renewed():
            client = SmtpClient.connect("127.0.0.1", daemon.port)
            try:
                return serial_of(starttls(client, pki)) == new_serial
            finally:
                client.close()
        realpeers.wait_until(renewed, 20, what="the renewed certificate on a new connection")
        # the session in progress goes on over its TLS session
        assert ongoing.command(b"RCPT TO:<user@example.org>\r\n") == b"250 2.1.5 Ok\r\n"
        assert ongoing.command(b"DATA\r\n").startswith(b"354")
        assert QUEUED.match(ongoing.command(b"Subject: x\r\n\r\nkept\r\n.\r\n"))
        ongoing.close()
