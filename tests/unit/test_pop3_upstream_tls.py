"""pop3gw.upstream's TLS settings without a server: an unusable server-ca
refuses every login before any connection is made (-ERR [SYS/TEMP], the
reason for the log), and server-tls none loads no ssl at all."""

import os

from pop3gw import upstream


def test_an_unusable_ca_file_refuses_the_login_before_connecting(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
    os.chmod(ca, 0o666)
    server_tls = upstream.UpstreamTLS("stls", True, str(ca))
    assert "writable by group or others" in server_tls.error
    connected = []
    try:
        upstream.login(["192.0.2.1"], 110, "alice",
                       lambda *args: connected.append(args), 5, server_tls, "mail.example")
    except upstream.UpstreamError as err:
        assert err.reply.startswith(b"-ERR [SYS/TEMP]")
        assert err.tls_error == server_tls.error and "server-tls stls" in err.reason
    else:
        raise AssertionError("logged in")
    assert connected == []


def test_no_server_tls_makes_no_context():
    server_tls = upstream.UpstreamTLS("none", True, None)
    assert server_tls.context is None and server_tls.error is None and server_tls.tls is None
