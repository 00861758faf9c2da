"""A milter stand-in that says what a test wants, right or wrong (issue 15).

It listens on 127.0.0.1 (or a unix socket), answers the negotiation, and
then answers every event that wants a reply with "continue" (the end of
the message with "accept"), except where `script` says otherwise:
script maps an event command octet (b"C", b"H", b"M", b"R", b"T", b"L",
b"N", b"B", b"E") to raw bytes to send instead, or to HANG (send nothing,
keep the connection) or CLOSE (close the connection).  It records every
packet it got, so tests can see what smap sent.  A thread per
connection; everything stops at close().
"""

import os
import socket
import struct
import threading

HANG, CLOSE = "hang", "close"
EVENTS_WITH_REPLY = b"CHMRTLNBE"


def pkt(command, payload=b""):
    """A raw milter packet: command is one octet (bytes or int)."""
    if isinstance(command, int):
        command = bytes([command])
    return struct.pack(">I", len(payload) + 1) + command + payload


def optneg_reply(version=6, actions=0x31, protocol=0):
    return pkt(b"O", struct.pack(">III", version, actions, protocol))


class HostileMilter:
    def __init__(self, script=None, negotiation=None, unix_path=None):
        self.script = dict(script or {})
        self.negotiation = optneg_reply() if negotiation is None else negotiation
        self.received = []          # (command octet, payload)
        self.lock = threading.Lock()
        self.running = True
        self.threads = []
        self.connections = []
        if unix_path:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(unix_path))
            os.chmod(str(unix_path), 0o666)
            self.spec = "unix:%s" % unix_path
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.bind(("127.0.0.1", 0))
            self.spec = "inet:127.0.0.1:%d" % self.listener.getsockname()[1]
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections.append(conn)
            thread = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def read_packet(self, conn, buffer):
        while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
            data = conn.recv(65536)
            if not data:
                return None, buffer
            buffer += data
        length = struct.unpack(">I", buffer[:4])[0]
        return (buffer[4:5], buffer[5:4 + length]), buffer[4 + length:]

    def serve(self, conn):
        buffer = b""
        conn.settimeout(60)
        try:
            while self.running:
                item, buffer = self.read_packet(conn, buffer)
                if item is None:
                    return
                command, payload = item
                with self.lock:
                    self.received.append((command, payload))
                if command == b"O":
                    conn.sendall(self.negotiation)
                    continue
                if command == b"Q":
                    return
                if command not in [bytes([c]) for c in EVENTS_WITH_REPLY]:
                    continue        # macros, abort: no reply
                action = self.script.get(command)
                if action == HANG:
                    while self.running:
                        try:
                            if not conn.recv(65536):
                                return
                        except socket.timeout:
                            continue
                    return
                if action == CLOSE:
                    return
                if action is None:
                    action = pkt(b"a") if command == b"E" else pkt(b"c")
                conn.sendall(action)
        except OSError:
            return
        finally:
            conn.close()

    def commands(self):
        with self.lock:
            return [c for c, _ in self.received]

    def payloads(self, command):
        with self.lock:
            return [p for c, p in self.received if c == command]

    def close(self):
        self.running = False
        self.listener.close()
        for conn in self.connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
