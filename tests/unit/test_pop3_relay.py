"""pop3-gw's relay on socketpairs: bytes unchanged both ways and counted,
the client's end reaches the server as EOF and never as an invented QUIT,
and an idle relay ends at its timeout."""

import os
import socket
import threading

from pop3gw import relay


def pairs():
    client_app, client_gw = socket.socketpair()
    server_gw, server_app = socket.socketpair()
    return client_app, client_gw, server_gw, server_app


def run_relay(client_gw, server_gw, timeout=10, **kwargs):
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        r=relay.relay(client_gw.fileno(), client_gw.fileno(), server_gw, timeout, **kwargs)))
    thread.start()
    return thread, result


def read_all(sock, limit=64 << 20):
    """Until EOF, or until limit bytes (the relay does not close the client
    side itself: the session process ends and that closes it)."""
    sock.settimeout(30)
    data = bytearray()
    while len(data) < limit:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_large_transfer_is_unchanged_and_counted():
    client_app, client_gw, server_gw, server_app = pairs()
    payload = os.urandom(8 << 20)
    thread, result = run_relay(client_gw, server_gw, to_server=b"STAT\r\n", to_client=b"+OK\r\n")
    assert server_app.recv(6) == b"STAT\r\n"
    client_app.sendall(b"RETR 1\r\n")
    assert server_app.recv(8) == b"RETR 1\r\n"
    sender = threading.Thread(target=lambda: (server_app.sendall(payload), server_app.close()))
    sender.start()
    received = read_all(client_app, len(payload) + 5)
    sender.join(30)
    thread.join(30)
    assert received == b"+OK\r\n" + payload
    outcome = result["r"]
    assert outcome.ended == "server closed"
    assert outcome.server_bytes == len(payload) + 5
    assert outcome.client_bytes == 6 + 8
    for sock in (client_app, client_gw, server_gw):
        sock.close()


def test_client_gone_is_eof_to_the_server_not_quit():
    client_app, client_gw, server_gw, server_app = pairs()
    thread, result = run_relay(client_gw, server_gw)
    client_app.sendall(b"DELE 1\r\n")
    client_app.close()                                     # vanishes without QUIT
    assert read_all(server_app) == b"DELE 1\r\n"            # then EOF: nothing added
    server_app.close()
    thread.join(30)
    assert not thread.is_alive() and result["r"].client_bytes == 8
    client_gw.close()
    server_gw.close()


def test_idle_relay_ends_at_timeout():
    client_app, client_gw, server_gw, server_app = pairs()
    thread, result = run_relay(client_gw, server_gw, timeout=0.3)
    thread.join(30)
    assert not thread.is_alive() and result["r"].ended == "timeout"
    for sock in (client_app, client_gw, server_gw, server_app):
        sock.close()


def test_copy_fallback_when_splice_is_impossible(monkeypatch):
    def no_splice(*args):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(relay.os, "splice", no_splice)
    client_app, client_gw, server_gw, server_app = pairs()
    thread, result = run_relay(client_gw, server_gw)
    client_app.sendall(b"LIST\r\n")
    assert server_app.recv(6) == b"LIST\r\n"
    server_app.sendall(b"+OK 0 messages\r\n.\r\n")
    server_app.close()
    assert read_all(client_app, 19) == b"+OK 0 messages\r\n.\r\n"
    thread.join(30)
    assert result["r"].ended == "server closed"
    for sock in (client_app, client_gw, server_gw):
        sock.close()
