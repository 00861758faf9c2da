"""common.tls: the server and client contexts, the key file's trust checks,
-n, the SIGHUP reload and the log fields.

Handshakes run over socketpairs inside the test process (no port); the
certificates come from a private CA made by openssl once for the module
(no key is committed).  What a hostile client or a local user would try:
an old protocol, a cipher without forward secrecy, a key others may read,
a link planted where root reads the key, a pair that does not match.
"""

import os
import pwd
import socket
import ssl
import threading

import pytest

from common import netperm, tls
from tests.integration import realpeers, tlspeers


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    realpeers.require("openssl")
    directory = tmp_path_factory.mktemp("ca")
    os.chmod(directory, 0o755)
    authority = tlspeers.TestCA(directory)
    authority.good = authority.leaf("good")
    authority.other_name = authority.leaf("wrongname", sans=("DNS:other.example.test",),
                                          cn="other.example.test")
    return authority


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("otherca")
    os.chmod(directory, 0o755)
    authority = tlspeers.TestCA(directory, name="other")
    authority.good = authority.leaf("other-good")
    return authority


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))

    def __getattr__(self, name):
        if name in ("info", "notice", "warning", "error"):
            return self._add(name)
        raise AttributeError(name)


def serve_once(context, data=b"hello"):
    """A socketpair whose other end runs a TLS server with context in a
    thread; returns (client socket, result dict filled by the server)."""
    ours, theirs = socket.socketpair()
    result = {}

    def run():
        try:
            theirs.settimeout(5)
            server = context.wrap_socket(theirs, server_side=True)
            result["version"] = server.version()
            server.sendall(data)
            result["got"] = server.recv(100)
            server.close()
        except (ssl.SSLError, OSError) as err:
            result["error"] = err
            theirs.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result["thread"] = thread
    return ours, result


def test_server_context_is_tls12_plus_forward_secret_aead_without_tickets(ca):
    context = tls.server_context(str(ca.good[0]), str(ca.good[1]))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.TLSv1_3
    for flag in (ssl.OP_NO_COMPRESSION, ssl.OP_NO_RENEGOTIATION, ssl.OP_NO_TICKET,
                 ssl.OP_CIPHER_SERVER_PREFERENCE):
        assert context.options & flag, flag
    assert context.num_tickets == 0
    for cipher in context.get_ciphers():
        if cipher["protocol"] == "TLSv1.2":
            assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]
            assert cipher["aead"], cipher["name"]
    assert context.cert_store_stats()["x509_ca"] == 0     # no CA store in a server


def test_handshake_gives_the_log_fields_and_no_session_ticket(ca):
    context = tls.server_context(str(ca.good[0]), str(ca.good[1]))
    sock, result = serve_once(context)
    client = tls.handshake(sock, tls.client_context(True, str(ca.root)), "localhost", 5)
    assert client.recv(5) == b"hello"
    fields = tls.session_fields(client)
    assert fields["tls"] == "TLSv1.3" and fields["cipher"].startswith("TLS_")
    assert client.compression() is None
    client.sendall(b"bye")
    result["thread"].join(5)
    assert result["got"] == b"bye"
    assert client.session is None or not client.session.has_ticket
    client.close()


def test_old_protocols_and_ciphers_without_forward_secrecy_are_refused(ca):
    context = tls.server_context(str(ca.good[0]), str(ca.good[1]))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.warns(DeprecationWarning):
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    sock, result = serve_once(context)
    with pytest.raises((ssl.SSLError, OSError)):
        tls.handshake(sock, old, "localhost", 5)
    result["thread"].join(5)
    assert "error" in result
    rsa = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rsa.check_hostname, rsa.verify_mode = False, ssl.CERT_NONE
    rsa.maximum_version = ssl.TLSVersion.TLSv1_2
    rsa.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")        # RSA key exchange
    sock, result = serve_once(context)
    with pytest.raises((ssl.SSLError, OSError)):
        tls.handshake(sock, rsa, "localhost", 5)
    result["thread"].join(5)
    assert "error" in result


def test_tls_min_version_13_refuses_a_tls12_client(ca):
    context = tls.server_context(str(ca.good[0]), str(ca.good[1]), "TLSv1.3")
    client = tls.client_context(False)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    sock, result = serve_once(context)
    with pytest.raises((ssl.SSLError, OSError)):
        tls.handshake(sock, client, "localhost", 5)
    result["thread"].join(5)


def copy(source, target, mode):
    target.write_bytes(source.read_bytes())
    os.chmod(target, mode)
    return target


def test_a_key_others_may_read_or_write_or_own_is_refused(ca, tmp_path):
    chain = str(ca.good[0])
    readable = copy(ca.good[1], tmp_path / "readable.key", 0o640)
    with pytest.raises(tls.TLSFileError) as err:
        tls.server_context(chain, str(readable))
    assert str(err.value) == ("%s: readable by group or others (mode 0640); it must be 0600"
                              % readable)
    writable = copy(ca.good[1], tmp_path / "writable.key", 0o622)
    with pytest.raises(tls.TLSFileError, match="writable by group or others"):
        tls.server_context(chain, str(writable))
    if os.geteuid() == 0:
        owned = copy(ca.good[1], tmp_path / "uucp.key", 0o600)
        os.chown(owned, pwd.getpwnam("uucp").pw_uid, -1)
        with pytest.raises(tls.TLSFileError, match="owned by uid"):
            tls.server_context(chain, str(owned))


def test_a_link_is_followed_only_where_root_alone_could_have_made_it(ca, tmp_path):
    """The ACME layout (live/NAME/privkey.pem -> ../../archive/NAME/privkey1.pem)
    works; a link in a directory others may write, or a link of another
    user's, is refused before anything is opened through it."""
    archive = tmp_path / "archive" / "mx"
    live = tmp_path / "live" / "mx"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    copy(ca.good[1], archive / "privkey1.pem", 0o600)
    copy(ca.good[0], archive / "fullchain1.pem", 0o644)
    os.symlink("../../archive/mx/privkey1.pem", live / "privkey.pem")
    os.symlink("../../archive/mx/fullchain1.pem", live / "fullchain.pem")
    context = tls.server_context(str(live / "fullchain.pem"), str(live / "privkey.pem"))
    assert context is not None
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    os.symlink(str(archive / "privkey1.pem"), shared / "privkey.pem")
    with pytest.raises(tls.TLSFileError, match="writable by group or others"):
        tls.server_context(str(ca.good[0]), str(shared / "privkey.pem"))
    if os.geteuid() == 0:
        os.symlink(str(archive / "privkey1.pem"), live / "theirs.pem")
        os.lchown(live / "theirs.pem", pwd.getpwnam("uucp").pw_uid, -1)
        with pytest.raises(tls.TLSFileError, match="symbolic link owned by uid"):
            tls.server_context(str(ca.good[0]), str(live / "theirs.pem"))
    # a link to a key others may read says so, with both names
    copy(ca.good[1], archive / "open.pem", 0o644)
    os.symlink("../../archive/mx/open.pem", live / "open.pem")
    with pytest.raises(tls.TLSFileError, match="readable by group or others.*through a link"):
        tls.server_context(str(ca.good[0]), str(live / "open.pem"))


def test_a_pair_that_does_not_match_or_an_encrypted_key_is_named(ca, other_ca, tmp_path):
    with pytest.raises(tls.TLSFileError) as err:
        tls.server_context(str(ca.good[0]), str(other_ca.good[1]))
    assert str(err.value) == "%s: the key does not match the certificate in %s" % (
        other_ca.good[1], ca.good[0])
    locked = tmp_path / "locked.key"
    fd = os.open(locked, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    data = tlspeers._openssl("pkey", "-in", str(ca.good[1]), "-aes256", "-passout", "pass:x")
    locked.write_bytes(data)
    with pytest.raises(tls.TLSFileError, match="encrypted"):
        tls.server_context(str(ca.good[0]), str(locked))
    empty = copy(ca.good[1], tmp_path / "empty.key", 0o600)
    empty.write_bytes(b"not a key\n")
    with pytest.raises(tls.TLSFileError, match="no PEM data"):
        tls.server_context(str(ca.good[0]), str(empty))
    with pytest.raises(tls.TLSFileError, match="does not exist"):
        tls.server_context(str(ca.good[0]), str(tmp_path / "absent.key"))


def table(tmp_path, text):
    path = tmp_path / "table"
    path.write_text(text)
    return path


def test_check_config_reports_what_start_up_would_refuse(ca, tmp_path):
    readable = copy(ca.good[1], tmp_path / "readable.key", 0o644)
    config = netperm.parse("smap: tls-cert %s\nsmap: tls-key %s\n" % (ca.good[0], readable),
                           "table", "smap")
    assert tls.check_config(config) == [
        "%s: readable by group or others (mode 0644); it must be 0600" % readable]
    config = netperm.parse("pop3-gw: tls-cert %s\n" % ca.good[0], "table", "pop3-gw")
    assert tls.check_config(config) == [
        "table: tls-cert and tls-key go together; tls-key is not set"]
    config = netperm.parse("smap: tls-cert %s\nsmap: tls-key %s\n" % ca.good, "table", "smap")
    assert tls.check_config(config) == []
    open_ca = copy(ca.root, tmp_path / "open-ca.pem", 0o666)
    config = netperm.parse("smapd: mailhub-tls verify\nsmapd: mailhub-ca %s\n" % open_ca,
                           "table", "smapd")
    assert tls.check_config(config) == [
        "%s: writable by group or others (mode 0666)" % open_ca]
    config = netperm.parse("pop3-gw: server-tls stls\npop3-gw: server-ca %s\n" % ca.root,
                           "table", "pop3-gw")
    assert tls.check_config(config) == []


def test_choice_attributes_take_only_their_words():
    config = netperm.parse("smapd: mailhub-tls Encrypt\npop3-gw: server-tls ssl\n"
                           "smap: tls-min-version tlsv1.3\n", "table", "smapd")
    assert config.get("mailhub-tls") == "encrypt" and config.errors == []
    assert netperm.parse("smapd: mailhub-tls maybe\n", "t", "smapd").errors[0].message == \
        "mailhub-tls: 'maybe' is not one of none, may, encrypt, verify"
    assert netperm.parse("smap: tls-min-version tlsv1.3\n", "t", "smap").get(
        "tls-min-version") == "TLSv1.3"
    assert netperm.parse("smap: tls-min-version TLSv1.1\n", "t", "smap").errors
    assert netperm.parse("pop3-gw: server-tls ssl\n", "t", "pop3-gw").errors
    assert netperm.parse("smapd: wakeup 5\n", "t", "smapd").get("mailhub-tls") == "may"


def test_reload_takes_renewed_files_and_keeps_the_old_context_on_failure(ca, other_ca,
                                                                          tmp_path):
    chain = copy(ca.good[0], tmp_path / "chain.pem", 0o644)
    key = copy(ca.good[1], tmp_path / "key.pem", 0o600)
    server = tls.ServerTLS(str(chain), str(key))
    first = server.load()
    log = Log()
    os.chmod(key, 0o644)             # a renewal that got the mode wrong
    assert server.reload(log) is False
    assert server.context is first
    assert log.lines[-1][0:2] == ("error", "tls-reload")
    assert "readable by group or others" in log.lines[-1][2]["reason"]
    # a renewed pair, key first then certificate, as REAL-PEERS describes
    copy(other_ca.good[1], tmp_path / "key.new", 0o600)
    os.rename(tmp_path / "key.new", key)
    copy(other_ca.good[0], tmp_path / "chain.new", 0o644)
    os.rename(tmp_path / "chain.new", chain)
    assert server.reload(log) is True and server.context is not first
    sock, result = serve_once(server.context)
    client = tls.handshake(sock, tls.client_context(True, str(other_ca.root)), "localhost", 5)
    assert client.recv(5) == b"hello"
    client.sendall(b"x")
    client.close()
    result["thread"].join(5)


def test_client_verification_names_the_failure(ca, other_ca):
    server = tls.server_context(str(ca.other_name[0]), str(ca.other_name[1]))
    sock, result = serve_once(server)
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        tls.handshake(sock, tls.client_context(True, str(ca.root)), "localhost", 5)
    assert tls.describe_error(err.value).startswith("certificate verify failed: Hostname mismatch")
    result["thread"].join(5)
    sock, result = serve_once(tls.server_context(str(ca.good[0]), str(ca.good[1])))
    with pytest.raises(ssl.SSLCertVerificationError) as err:
        tls.handshake(sock, tls.client_context(True, str(other_ca.root)), "localhost", 5)
    assert "unable to get local issuer certificate" in tls.describe_error(err.value)
    result["thread"].join(5)
    # without verification the same server is accepted (encrypt level)
    sock, result = serve_once(server)
    client = tls.handshake(sock, tls.client_context(False), "localhost", 5)
    assert client.recv(5) == b"hello"
    client.sendall(b"x")
    client.close()
    result["thread"].join(5)


def test_client_context_loads_the_system_store_at_once():
    context = tls.client_context(True)
    assert context.cert_store_stats()["x509_ca"] > 0 or tls.system_bundle() is None
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_describe_error_is_one_bounded_printable_line():
    text = tls.describe_error(ssl.SSLError(1, "bad\r\nthing " + "x" * 500))
    assert "\n" not in text and len(text) <= tls.MAX_ERROR
    assert tls.describe_error(socket.timeout("timed out")) == "handshake timed out"


def test_dash_n_lists_a_key_others_may_read(ca, tmp_path):
    """`smap -n` (common.cli.check_table) says `FILE: reason` and exits 1."""
    import io

    from common import cli
    readable = copy(ca.good[1], tmp_path / "open.key", 0o644)
    config = netperm.parse("smap: tls-cert %s\nsmap: tls-key %s\n" % (ca.good[0], readable),
                           "table", "smap")
    out = io.StringIO()
    assert cli.check_table(config, out) == 1
    assert out.getvalue() == "%s: readable by group or others (mode 0644); it must be 0600\n" \
        % readable
    good = netperm.parse("smap: tls-cert %s\nsmap: tls-key %s\n" % ca.good, "table", "smap")
    assert cli.check_table(good, io.StringIO()) == 0
