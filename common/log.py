"""syslog logging (DESIGN §9): one event a line, key=value fields.

The datagram socket is opened before any chroot and kept open, so a jailed
process can still log; when a send fails (syslogd was restarted and its
socket replaced), the path is connected again and the line sent once more.
Messages go only to that socket, never to stderr: in inetd mode fd 2 is
the client's connection.  A foreground daemon may
also echo to stderr when asked (`-F` from a terminal).  Values are
sanitised so that nothing a client sends can forge a second log line.
"""

import os
import _socket  # not `socket`, whose enums cost smap milliseconds at every start
import time

LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG = 3, 4, 5, 6, 7
MAX_VALUE = 256


def clean(value):
    """A value safe for one log line: printable ASCII, bounded, quoted if spaced."""
    text = value if isinstance(value, str) else (
        value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    if not (text.isascii() and text.isprintable()) or '"' in text:
        text = "".join("'" if c == '"' else (c if 32 <= ord(c) < 127 else "?") for c in text)
    if " " in text or text == "":
        text = '"%s"' % text
    return text


def format_event(event, fields):
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        parts.append("%s=%s" % (key, clean(value)))
    return " ".join(parts)


class Log:
    """A syslog client on one AF_UNIX datagram socket."""

    def __init__(self, ident, facility=2, socket_path="/dev/log", echo=None):
        self.ident = ident
        self.facility = facility
        self.socket_path = socket_path
        self.echo = echo          # a file object for foreground echo, or None
        self.sock = None
        self.connect()

    def connect(self):
        """Open the socket now (before a chroot); failure is silent but remembered."""
        if self.sock is not None:
            return
        for kind in (_socket.SOCK_DGRAM, _socket.SOCK_STREAM):
            sock = None
            try:
                sock = _socket.socket(_socket.AF_UNIX, kind)
                sock.connect(self.socket_path)
                self.sock, self.kind = sock, kind
                return
            except OSError:
                if sock is not None:    # socket() itself may have failed (EMFILE)
                    sock.close()

    def reopen(self, facility=None, socket_path=None):
        """Point the log at the table's logsocket/logfacility."""
        if facility is not None:
            self.facility = facility
        if socket_path is not None and socket_path != self.socket_path:
            self.socket_path = socket_path
            self.close()
        self.connect()

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data):
        """True when the line went out (or there is no socket to try)."""
        if self.sock is None:
            return True
        try:
            if self.kind == _socket.SOCK_STREAM:
                self.sock.sendall(data + b"\0")
            else:
                self.sock.send(data)
        except OSError:
            return False
        return True

    def emit(self, priority, text):
        stamp = time.strftime("%b %d %H:%M:%S")
        message = "<%d>%s %s[%d]: %s" % (self.facility * 8 + priority, stamp,
                                         self.ident, os.getpid(), text)
        data = message.encode("utf-8", "replace")
        if not self.send(data):
            # syslogd was restarted (a new socket at the same path): connect
            # again and retry once.  Inside a chroot the path is usually not
            # there, and the line is lost as before; the long-lived parents
            # outside it reconnect, and their new children inherit that.
            self.close()
            self.connect()
            self.send(data)
        if self.echo is not None:
            try:
                self.echo.write("%s[%d]: %s\n" % (self.ident, os.getpid(), text))
                self.echo.flush()
            except (OSError, ValueError):
                pass

    def event(self, priority, event, **fields):
        self.emit(priority, format_event(event, fields))

    def info(self, event, **fields):
        self.event(LOG_INFO, event, **fields)

    def notice(self, event, **fields):
        self.event(LOG_NOTICE, event, **fields)

    def warning(self, event, **fields):
        self.event(LOG_WARNING, event, **fields)

    def error(self, event, **fields):
        self.event(LOG_ERR, event, **fields)
