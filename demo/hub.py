#!/usr/bin/env python3
"""demo/hub.py: a stand-in for the internal mail hub, for the quick start.

It plays mail.yoyodyne.com on loopback: an SMTP sink that stores each
message in a Maildir per recipient local part (MAILDIRS/<local>/new/), and
a POP3 server with APOP (RFC 1939) over those Maildirs, with the secrets
of a `user:secret` file.  It is a demo stand-in, not a product: stdlib
only, threads, no TLS, no locking beyond one lock per mailbox open.  It
trusts its command line and the users file; it trusts nothing from the
network beyond bounded line lengths.  Real deployments use a real MTA and
a real POP3 server (the integration tests use Postfix and Dovecot).

    hub.py --maildirs DIR --users FILE [--smtp ADDR:PORT] [--pop3 ADDR:PORT]
           [--ready FILE]

Port 0 lets the kernel choose; the chosen ports are written to --ready as
`smtp PORT` and `pop3 PORT` lines once both listen.  SIGTERM/SIGINT stop it.
"""

import argparse
import hashlib
import hmac
import os
import signal
import socket
import socketserver
import sys
import threading
import time

MAX_LINE = 1024
MAX_MESSAGE = 64 << 20
_sequence = [0]
_sequence_lock = threading.Lock()


def unique_name():
    with _sequence_lock:
        _sequence[0] += 1
        return "%d.M%dP%d.hub" % (time.time(), _sequence[0], os.getpid())


def store(maildirs, local, message):
    """Write message into MAILDIRS/local/new the Maildir way (tmp, then rename)."""
    box = os.path.join(maildirs, local)
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(box, sub), 0o700, exist_ok=True)
    name = unique_name()
    tmp = os.path.join(box, "tmp", name)
    with open(tmp, "wb") as out:
        out.write(message)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp, os.path.join(box, "new", name))


def local_part(address):
    local = address.strip("<>").rsplit("@", 1)[0].lower()
    if not local or local.startswith(".") or "/" in local or "\0" in local:
        return None
    return local


class LineHandler(socketserver.StreamRequestHandler):
    timeout = 120

    def send(self, text):
        self.wfile.write(text.encode() + b"\r\n")

    def line(self):
        data = self.rfile.readline(MAX_LINE)
        if not data:
            raise EOFError
        return data.rstrip(b"\r\n").decode("utf-8", "replace")


class SMTPHandler(LineHandler):
    """RFC 5321, just enough for smapd: EHLO/HELO MAIL RCPT DATA RSET NOOP QUIT."""

    def handle(self):
        sender, rcpts = None, []
        self.send("220 hub.mailwall.test ESMTP demo hub")
        try:
            while True:
                line = self.line()
                verb = line[:4].upper()
                if verb in ("EHLO", "HELO"):
                    self.send("250-hub.mailwall.test" if verb == "EHLO" else "250 hub.mailwall.test")
                    if verb == "EHLO":
                        self.send("250-8BITMIME")
                        self.send("250 SIZE %d" % MAX_MESSAGE)
                elif verb == "MAIL":
                    sender, rcpts = line[10:].split()[0] if line[10:].split() else "<>", []
                    self.send("250 2.1.0 Ok")
                elif verb == "RCPT":
                    local = local_part(line[8:].split()[0] if line[8:].split() else "")
                    if sender is None or local is None:
                        self.send("501 5.1.3 Bad recipient")
                    else:
                        rcpts.append(local)
                        self.send("250 2.1.5 Ok")
                elif verb == "DATA":
                    if not rcpts:
                        self.send("554 5.5.1 No valid recipients")
                        continue
                    self.send("354 End data with <CR><LF>.<CR><LF>")
                    message = self.data()
                    for local in rcpts:
                        store(self.server.maildirs, local, b"Return-Path: %s\r\n" % sender.encode() + message)
                    self.send("250 2.0.0 Ok: stored for %s" % " ".join(rcpts))
                    sender, rcpts = None, []
                elif verb == "RSET":
                    sender, rcpts = None, []
                    self.send("250 2.0.0 Ok")
                elif verb == "NOOP":
                    self.send("250 2.0.0 Ok")
                elif verb == "QUIT":
                    self.send("221 2.0.0 Bye")
                    return
                else:
                    self.send("502 5.5.2 Not implemented")
        except (EOFError, OSError):
            return

    def data(self):
        lines, size = [], 0
        while True:
            raw = self.rfile.readline(MAX_LINE * 8)
            if not raw:
                raise EOFError
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            if raw.startswith(b"."):
                raw = raw[1:]
            size += len(raw)
            if size > MAX_MESSAGE:
                raise EOFError
            lines.append(raw)


def read_users(path):
    users = {}
    with open(path) as table:
        for line in table:
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                name, secret = line.split(":", 1)
                users[name] = secret
    return users


class POP3Handler(LineHandler):
    """RFC 1939 with APOP (and USER/PASS) over MAILDIRS/<user>."""

    def handle(self):
        stamp = "<%d.%d.%s@hub.mailwall.test>" % (os.getpid(), time.time_ns(), os.urandom(4).hex())
        self.send("+OK demo hub POP3 ready %s" % stamp)
        user, box = None, None
        try:
            while box is None:
                words = self.line().split()
                verb = words[0].upper() if words else ""
                if verb == "APOP" and len(words) == 3:
                    secret = read_users(self.server.users).get(words[1])
                    digest = hashlib.md5((stamp + (secret or "")).encode()).hexdigest()
                    if secret is not None and hmac.compare_digest(digest, words[2].lower()):
                        box = self.open_box(words[1])
                    else:
                        self.send("-ERR [AUTH] authentication failed")
                elif verb == "USER" and len(words) == 2:
                    user = words[1]
                    self.send("+OK")
                elif verb == "PASS" and user is not None and len(words) >= 2:
                    secret = read_users(self.server.users).get(user)
                    if secret is not None and hmac.compare_digest(secret, " ".join(words[1:])):
                        box = self.open_box(user)
                    else:
                        self.send("-ERR [AUTH] authentication failed")
                elif verb == "CAPA":
                    self.send("+OK capabilities follow")
                    for capability in ("TOP", "UIDL", "USER", "RESP-CODES", "."):
                        self.send(capability)
                elif verb == "QUIT":
                    self.send("+OK bye")
                    return
                else:
                    self.send("-ERR authenticate first")
            self.transaction(box)
        except (EOFError, OSError):
            return

    def open_box(self, user):
        path = os.path.join(self.server.maildirs, user)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), 0o700, exist_ok=True)
        files = []
        for sub in ("cur", "new"):
            for name in sorted(os.listdir(os.path.join(path, sub))):
                files.append(os.path.join(path, sub, name))
        self.send("+OK %s has %d messages" % (user, len(files)))
        return files

    def transaction(self, files):
        deleted = set()
        sizes = [os.path.getsize(f) for f in files]

        def number(words):
            try:
                index = int(words[1]) - 1
            except (IndexError, ValueError):
                return None
            return index if 0 <= index < len(files) and index not in deleted else None

        while True:
            words = self.line().split()
            verb = words[0].upper() if words else ""
            live = [i for i in range(len(files)) if i not in deleted]
            if verb == "STAT":
                self.send("+OK %d %d" % (len(live), sum(sizes[i] for i in live)))
            elif verb in ("LIST", "UIDL") and len(words) == 1:
                self.send("+OK")
                for i in live:
                    value = sizes[i] if verb == "LIST" else os.path.basename(files[i]).split(":")[0]
                    self.send("%d %s" % (i + 1, value))
                self.send(".")
            elif verb in ("LIST", "UIDL"):
                i = number(words)
                if i is None:
                    self.send("-ERR no such message")
                else:
                    value = sizes[i] if verb == "LIST" else os.path.basename(files[i]).split(":")[0]
                    self.send("+OK %d %s" % (i + 1, value))
            elif verb in ("RETR", "TOP"):
                i = number(words)
                if i is None:
                    self.send("-ERR no such message")
                    continue
                with open(files[i], "rb") as message:
                    data = message.read()
                if verb == "TOP":
                    head, _, body = data.partition(b"\r\n\r\n")
                    count = int(words[2]) if len(words) > 2 and words[2].isdigit() else 0
                    data = head + b"\r\n\r\n" + b"".join(body.splitlines(True)[:count])
                self.wfile.write(b"+OK %d octets\r\n" % sizes[i])
                for line in data.splitlines():
                    self.wfile.write((b"." + line if line.startswith(b".") else line) + b"\r\n")
                self.send(".")
            elif verb == "DELE":
                i = number(words)
                if i is None:
                    self.send("-ERR no such message")
                else:
                    deleted.add(i)
                    self.send("+OK deleted")
            elif verb == "RSET":
                deleted.clear()
                self.send("+OK")
            elif verb == "NOOP":
                self.send("+OK")
            elif verb == "QUIT":
                for i in deleted:
                    try:
                        os.unlink(files[i])
                    except FileNotFoundError:
                        pass
                self.send("+OK bye")
                return
            else:
                self.send("-ERR unknown command")


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def hostport(text):
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv=None):
    parser = argparse.ArgumentParser(description="the quick start's stand-in mail hub")
    parser.add_argument("--maildirs", required=True)
    parser.add_argument("--users", required=True)
    parser.add_argument("--smtp", default="127.0.0.1:0", type=hostport)
    parser.add_argument("--pop3", default="127.0.0.1:0", type=hostport)
    parser.add_argument("--ready")
    args = parser.parse_args(argv)
    os.makedirs(args.maildirs, 0o700, exist_ok=True)
    servers = []
    for address, handler in ((args.smtp, SMTPHandler), (args.pop3, POP3Handler)):
        server = Server(address, handler)
        server.maildirs, server.users = args.maildirs, args.users
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    if args.ready:
        tmp = args.ready + ".tmp"
        with open(tmp, "w") as ready:
            ready.write("smtp %d\npop3 %d\n" % (servers[0].server_address[1], servers[1].server_address[1]))
        os.rename(tmp, args.ready)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
