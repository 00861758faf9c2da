"""The prober: smapd's process that asks the mail hub whether recipients
exist (issue 14, `verify-recipients`; DESIGN §12.2).

smap is jailed in the spool and never connects to the hub itself.  It
sends the prober one datagram on the AF_UNIX socket `DIRECTORY/.verify`:
the address, nothing else; the prober probes the hub, writes the answer
into the cache (common.verifycache) and sends one byte back to every
socket that asked for that address, which wakes the smap processes
waiting for it; they read the answer from the cache.

The prober is forked by smapd at start-up (daemon and -F modes, when the
table says `smap: verify-recipients yes`), runs as `userid` outside the
chroot with the network, like the delivery agent, and ends when the
scanner does (the end of a pipe it holds).  It is single-threaded except
for the probes themselves, each in a thread of its own; only the main
loop touches the cache and the sockets.

What it trusts: nothing a datagram says.  A request is refused (logged,
not answered) unless it is at most MAX_REQUEST octets of ASCII forming
an address that common.address accepts, at one of the accept-domains.
Whatever a flood of requests asks for, the hub sees:
  - at most one probe in flight per address (the cache key), and none
    for an address whose record is fresh;
  - at most `verify-rate` probe connections in any one-second window,
    and at most MAX_CONCURRENT at once; the rest wait in a queue of at
    most MAX_QUEUE addresses (beyond it a request is dropped: smap's
    client gets 450 and retries);
  - each probe is EHLO (HELO if refused), MAIL FROM:<>, RCPT TO:<addr>,
    RSET, QUIT and never DATA, cut at `deliver-timeout` as a whole.
The hub is untrusted too: a reply must be CRLF lines of `NNN-text` /
`NNN text` with one code, at most MAX_REPLY_LINE octets a line and
MAX_REPLY_LINES lines, and nothing may arrive unasked (before a command
or after a reply): anything else, a wrong code at any step but RCPT, a
4xx at RCPT, a timeout or a refused connection makes the answer
`unavailable` (a temporary failure), never a positive or negative one.
After an unreachable hub the prober waits HUB_PAUSE seconds before it
connects again (requests meanwhile are answered `unavailable`).

Every probe has a log line: `probe to=<addr> result=ok|reject|unavailable
reply="..." duration=S`.
"""

import collections
import os
import queue
import select
import signal
import socket
import threading
import time

from common import address, netperm, params, privs, skeleton, verifycache

MAX_REQUEST = address.MAX_ADDRESS
MAX_QUEUE = 1000
MAX_CONCURRENT = 16
MAX_WAITERS = 64            # sockets woken for one address
MAX_REPLY_LINE = 1000
MAX_REPLY_LINES = 50
HUB_PAUSE = 10              # seconds without a connection after the hub was unreachable
SWEEP_INTERVAL = 600
OVERDUE_GRACE = 5           # seconds past deliver-timeout before a probe is given up


class Settings:
    """What the prober needs: from smapd's table (mailhub, deliver-timeout,
    accept-domains) and smap's (verify-*)."""

    def __init__(self, hub, timeout, accept_domains, rate, positive, negative, helo):
        self.hub = hub
        self.timeout = timeout
        self.accept_domains = list(accept_domains)
        self.rate = rate
        self.ttls = verifycache.lifetimes(positive, negative)
        self.helo = helo


def settings_of(config, helo):
    """Settings when smap's view of the same table turns verification on
    and names a mail hub, else None (no prober)."""
    view = netperm.load(config.path, params.SMAP)
    if view.errors or not view.get("verify-recipients") or view.get("mailhub") is None:
        return None
    return Settings(view.get("mailhub"), config.get("deliver-timeout"),
                    view.get("accept-domains") or config.get("accept-domains") or (),
                    view.get("verify-rate"), view.get("verify-positive-ttl"),
                    view.get("verify-negative-ttl"), helo)


# -- one probe ---------------------------------------------------------------

class Unavailable(Exception):
    """The hub could not answer the question: unreachable, slow, garbage."""


class ReplyReader:
    """Whole SMTP replies from the hub, under one deadline, strictly."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline = sock, deadline
        self.buffer = b""

    def fill(self):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable("mail hub timed out")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            raise Unavailable("mail hub timed out") from None
        if not data:
            raise Unavailable("mail hub closed the connection")
        self.buffer += data

    def line(self):
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
                if len(line) > MAX_REPLY_LINE or b"\n" in line or b"\r" in line:
                    raise Unavailable("mail hub sent a malformed line")
                return line
            if len(self.buffer) > MAX_REPLY_LINE or b"\n" in self.buffer:
                raise Unavailable("mail hub sent a malformed line")
            self.fill()

    def reply(self):
        """(code, [texts]) of one reply; nothing may follow it unasked."""
        code, texts = None, []
        while True:
            line = self.line()
            head = line[:3]
            if len(line) < 3 or not head.isdigit() or line[3:4] not in (b"", b" ", b"-") \
                    or head[:1] not in b"2345":
                raise Unavailable("mail hub sent garbage: %s"
                                  % verifycache.clean_reply(line[:60].decode("latin-1")))
            if code is not None and int(head) != code:
                raise Unavailable("mail hub changed the code inside a reply")
            code = int(head)
            texts.append(line[4:].decode("utf-8", "replace"))
            if len(texts) > MAX_REPLY_LINES:
                raise Unavailable("mail hub sent an endless reply")
            if line[3:4] != b"-":
                break
        if self.buffer:
            raise Unavailable("mail hub talked out of turn")
        return code, texts


def probe(hub, helo, recipient, timeout, connect=socket.create_connection):
    """(kind, reply text) of one probe: kind is verifycache.OK, REJECT or
    UNAVAILABLE; the reply is the hub's RCPT reply ("550 5.1.1 ...") or why
    the hub could not answer."""
    host, port = hub
    deadline = time.monotonic() + timeout
    sock = None
    try:
        try:
            sock = connect((host, port or 25), timeout=timeout)
        except OSError as err:
            raise Unavailable("mail hub unreachable: %s" % (err.strerror or err)) from None
        reader = ReplyReader(sock, deadline)

        def command(line):
            # data pending before we speak is a hub talking out of turn
            if reader.buffer:
                raise Unavailable("mail hub talked out of turn")
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.sendall(line)
            except socket.timeout:
                raise Unavailable("mail hub timed out") from None
            return reader.reply()

        def expect(reply, what):
            code, texts = reply
            if code // 100 != 2:
                raise Unavailable("mail hub refused %s: %d %s"
                                  % (what, code, verifycache.clean_reply(texts[0])[:200]))

        code, texts = reader.reply()
        if code != 220:
            raise Unavailable("mail hub greeted with %d %s"
                              % (code, verifycache.clean_reply(texts[0])[:200]))
        name = helo.encode("ascii", "replace")
        reply = command(b"EHLO %s\r\n" % name)
        if reply[0] // 100 != 2:
            reply = command(b"HELO %s\r\n" % name)
        expect(reply, "HELO")
        expect(command(b"MAIL FROM:<>\r\n"), "MAIL FROM:<>")
        code, texts = command(b"RCPT TO:<%s>\r\n" % recipient.encode("ascii"))
        text = verifycache.clean_reply("%d %s" % (code, texts[0]))
        if code // 100 == 2:
            kind = verifycache.OK
        elif code // 100 == 5:
            kind = verifycache.REJECT
        else:
            raise Unavailable("mail hub deferred RCPT: %s" % text)
        for line in (b"RSET\r\n", b"QUIT\r\n"):
            try:
                command(line)
            except (Unavailable, OSError):
                break       # the answer is known; how the hub says goodbye does not matter
        return kind, text
    except Unavailable as err:
        return verifycache.UNAVAILABLE, str(err)
    except OSError as err:
        return verifycache.UNAVAILABLE, "mail hub connection failed: %s" % (err.strerror or err)
    finally:
        if sock is not None:
            sock.close()


# -- the process ---------------------------------------------------------------

def request_problem(data, accept_domains):
    """(address, None) for a good request datagram, else (None, reason)."""
    if not data:
        return None, "empty request"
    if len(data) > MAX_REQUEST:
        return None, "request over %d octets" % MAX_REQUEST
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None, "request is not ASCII"
    reason = address.problem(text)
    if reason:
        return None, "not an address: %s" % reason
    if not address.in_domains(text, accept_domains):
        return None, "not at an accept-domains domain"
    return text, None


class Prober:
    """The prober's state: the queue, the probes in flight, the rate window."""

    def __init__(self, settings, store, log, sock=None, clock=time.time,
                 monotonic=time.monotonic, probe_function=probe):
        self.settings = settings
        self.store = store
        self.log = log
        self.sock = sock
        self.clock, self.monotonic = clock, monotonic
        self.probe_function = probe_function
        self.waiters = {}                   # key -> [socket addresses]
        self.queued = collections.OrderedDict()   # key -> address as asked
        self.inflight = {}                  # key -> (address, started, probe number)
        self.probes = 0                     # probes started, numbering them
        self.starts = collections.deque()   # monotonic times of the last `rate` starts
        self.results = queue.SimpleQueue()
        self.hub_down_until = 0.0
        self.last_sweep = 0.0
        self.wake_read, self.wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(self.wake_write, False)

    # -- requests ----------------------------------------------------------
    def request(self, data, sender):
        recipient, reason = request_problem(data, self.settings.accept_domains)
        if reason:
            self.log.warning("probe-refuse", reason=reason, request=data[:60])
            return
        key = verifycache.key_of(recipient)
        if key in self.inflight or key in self.queued:
            self.add_waiter(key, sender)
            return
        record, damaged = self.store.read(key, self.clock(), self.settings.ttls)
        if damaged:
            self.log.warning("verify-cache", to="<%s>" % recipient,
                             reason="damaged record: probing again")
        if record is not None and not record.due(self.clock()):
            self.wake([sender])         # answered already: the asker reads the cache
            return
        if self.monotonic() < self.hub_down_until:
            self.settle(key, recipient, verifycache.UNAVAILABLE,
                        "mail hub unreachable a moment ago: not probed", extra=[sender])
            return
        if len(self.queued) >= MAX_QUEUE:
            self.log.warning("probe-busy", to="<%s>" % recipient,
                             reason="%d addresses wait for a probe" % MAX_QUEUE)
            return
        self.queued[key] = recipient
        self.add_waiter(key, sender)

    def add_waiter(self, key, sender):
        if sender is None:
            return
        waiters = self.waiters.setdefault(key, [])
        if len(waiters) < MAX_WAITERS and sender not in waiters:
            waiters.append(sender)

    # -- probes ------------------------------------------------------------
    def next_start(self):
        """Seconds until another probe may start (0: now), None: nothing to start."""
        if not self.queued or len(self.inflight) >= MAX_CONCURRENT:
            return None
        if len(self.starts) < self.settings.rate:
            return 0.0
        return max(0.0, self.starts[0] + 1.0 - self.monotonic())

    def start_probes(self):
        while True:
            wait = self.next_start()
            if wait is None or wait > 0:
                return
            key, recipient = self.queued.popitem(last=False)
            if self.monotonic() < self.hub_down_until:
                self.settle(key, recipient, verifycache.UNAVAILABLE,
                            "mail hub unreachable a moment ago: not probed")
                continue
            now = self.monotonic()
            self.starts.append(now)
            while len(self.starts) > self.settings.rate:
                self.starts.popleft()
            self.probes += 1
            self.inflight[key] = (recipient, now, self.probes)
            self.launch(key, recipient, self.probes)

    def launch(self, key, recipient, number=0):
        def run():
            try:
                kind, text = self.probe_function(self.settings.hub, self.settings.helo,
                                                 recipient, self.settings.timeout)
            except Exception as err:        # a bug must not leave the address in flight
                kind, text = verifycache.UNAVAILABLE, "probe failed: %s" % type(err).__name__
            self.results.put((key, number, kind, text))
            try:
                os.write(self.wake_write, b".")
            except OSError:
                pass
        threading.Thread(target=run, daemon=True, name="probe").start()

    def finish(self):
        """Settle the probes that have ended."""
        try:
            while os.read(self.wake_read, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                key, number, kind, text = self.results.get_nowait()
            except queue.Empty:
                return
            flight = self.inflight.get(key)
            if flight is None or flight[2] != number:
                continue        # given up on by overdue(): its answer came too late
            recipient, started, _ = self.inflight.pop(key)
            if kind == verifycache.UNAVAILABLE and ("unreachable" in text or "timed out" in text):
                self.hub_down_until = self.monotonic() + HUB_PAUSE
            self.log.info("probe", to="<%s>" % recipient, result=kind, reply=text,
                          duration="%.3f" % (self.monotonic() - started))
            self.settle(key, recipient, kind, text)

    def overdue(self):
        """Give up on probes past deliver-timeout and a grace (a name lookup
        that hangs is not cut by the socket's timeout): unavailable."""
        now = self.monotonic()
        limit = self.settings.timeout + OVERDUE_GRACE
        for key, (recipient, started, _) in list(self.inflight.items()):
            if now - started > limit:
                del self.inflight[key]
                self.log.info("probe", to="<%s>" % recipient, result=verifycache.UNAVAILABLE,
                              reply="probe overran deliver-timeout: given up",
                              duration="%.3f" % (now - started))
                self.settle(key, recipient, verifycache.UNAVAILABLE,
                            "probe overran deliver-timeout: given up")

    def settle(self, key, recipient, kind, text, extra=()):
        """Write the answer to the cache and wake whoever asked.  A hub that
        cannot be asked does not overwrite an answer that is still valid
        (a refresh that failed): that answer is used until it expires."""
        now = int(self.clock())
        ttl = self.settings.ttls[kind]
        try:
            if kind == verifycache.UNAVAILABLE:
                current, _ = self.store.read(key, now, self.settings.ttls)
                if current is not None and current.kind != verifycache.UNAVAILABLE:
                    self.wake(self.waiters.pop(key, []) + list(extra))
                    return
            self.store.write(key, verifycache.Record(kind, now, now + ttl, text))
        except OSError as err:
            self.log.error("verify-cache", to="<%s>" % recipient,
                           reason="cannot write: %s" % (err.strerror or err))
        self.wake(self.waiters.pop(key, []) + list(extra))

    def wake(self, senders):
        if self.sock is None:
            return
        for sender in senders:
            if not sender:
                continue        # an unbound sender cannot be answered
            try:
                self.sock.sendto(b".", sender)
            except OSError:
                pass            # gone, or not a socket we may write: it polls the cache

    def sweep(self):
        now = self.monotonic()
        if now - self.last_sweep < SWEEP_INTERVAL:
            return
        self.last_sweep = now
        try:
            kept, removed = self.store.sweep(self.clock(), self.settings.ttls)
        except OSError as err:
            self.log.error("verify-cache", reason="sweep: %s" % (err.strerror or err))
            return
        if removed:
            self.log.info("verify-sweep", kept=kept, removed=removed)

    # -- the loop ----------------------------------------------------------
    def receive(self):
        """Take every datagram waiting (at most a bounded number at once)."""
        for _ in range(256):
            try:
                data, sender = self.sock.recvfrom(MAX_REQUEST + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.log.error("probe-receive", reason=err.strerror or str(err))
                return
            self.request(data, sender if isinstance(sender, (bytes, str)) else None)

    def run(self, stop_fd):
        """Serve until stop_fd (a pipe the scanner holds) reaches its end."""
        self.sock.setblocking(False)
        while True:
            self.sweep()
            self.overdue()
            self.start_probes()
            wait = self.next_start()
            timeout = SWEEP_INTERVAL if wait is None else max(0.005, wait)
            if self.inflight:
                timeout = min(timeout, 1.0)     # overdue() looks every second
            try:
                ready, _, _ = select.select([self.sock, self.wake_read, stop_fd], [], [],
                                            min(timeout, 60.0))
            except InterruptedError:
                continue
            if stop_fd in ready:
                break
            if self.wake_read in ready:
                self.finish()
            if self.sock in ready:
                self.receive()
        self.log.info("prober-stop", queued=len(self.queued), inflight=len(self.inflight))
        return 0


def bind(spool_fd):
    """The request socket `.verify` in the spool, made anew (cwd: the spool)."""
    os.fchdir(spool_fd)
    try:
        os.unlink(verifycache.SOCKET)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    old = os.umask(0o077)
    try:
        sock.bind(verifycache.SOCKET)   # relative: the spool, reached by descriptor
    finally:
        os.umask(old)
    os.chdir("/")
    return sock


def start(settings, logger, directory, uid, gid, close=()):
    """Fork the prober (as `userid`, no chroot; `close`: the parent's
    descriptors it must not hold); returns (pid, stop fd): the caller, the
    scanner, keeps the stop fd open, and the prober ends when it closes."""
    stop_read, stop_write = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(stop_read)
        return pid, stop_write
    status = 1
    try:
        os.close(stop_write)
        for fd in close:
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        spool_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        privs.drop(directory, uid, gid, chroot=False)
        skeleton.set_title("smapd: prober")
        store = verifycache.Store(spool_fd, logger)
        sock = bind(spool_fd)
        os.chdir("/")
        logger.info("prober-start", hub="%s:%d" % (settings.hub[0], settings.hub[1] or 25),
                    rate=settings.rate)
        status = Prober(settings, store, logger, sock).run(stop_read)
    except BaseException as err:    # the prober must never unwind into the scanner's code
        logger.error("prober-fatal", reason="%s: %s" % (type(err).__name__, err))
    finally:
        os._exit(status)

