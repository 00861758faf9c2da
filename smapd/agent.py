"""The delivery agent: the only smapd process outside the chroot (DESIGN §7).

It runs as `userid` (never root) with "/" as its working directory and
does one thing: take a delivery request from the chrooted scanner, fork a
worker (`smapd: delivering ID`) and report the outcome.  A request is one
SOCK_SEQPACKET datagram of at most MAX_REQUEST octets of JSON plus exactly
one descriptor (the claimed spool file, passed with SCM_RIGHTS, still
holding the scanner's flock so nobody else delivers it).  The agent trusts
nothing in it beyond these checks: exact keys and types, a valid queue id,
plain addresses (common.address: nothing that starts with `-`, `|` or
`/`), at most MAX_RECIPIENTS recipients, and an offset and length that lie
inside the regular file it got.

A worker runs `<sendmail words> -oi -f SENDER -- RCPT…` from an argv list,
never a shell, the message on its stdin, and kills the MTA's process group
after `deliver-timeout`.  Recipients for the `accept-domains` go straight
to the `mailhub` by SMTP when it is set.  Outcomes per recipient are
`ok`, `temp` or `perm`; the scanner decides what to do with them.  Their
texts come from the MTA's stderr and the mail hub's replies, bytes of any
kind: `diagnostic` makes each one printable line of at most MAX_DIAGNOSTIC
characters (valid UTF-8 kept, any other byte as `\\xNN`), so what crosses
to the scanner, its state files, logs and bounces is bounded and safe.
"""

import collections
import errno
import json
import os
import select
import signal
import smtplib
import socket
import subprocess
import time

from common import address, skeleton, spool

MAX_REQUEST = 192 * 1024
MAX_RESULT = 192 * 1024
MAX_RECIPIENTS = 100
MAX_HEAD = 128 * 1024
MAX_DIAGNOSTIC = 300            # characters of an MTA's stderr or a hub's reply kept
MAX_STDERR = 2048               # octets of the MTA's stderr read at most
CHUNK = 65536
MTA_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

EXIT_NAMES = {0: "EX_OK", 64: "EX_USAGE", 65: "EX_DATAERR", 66: "EX_NOINPUT",
              67: "EX_NOUSER", 68: "EX_NOHOST", 69: "EX_UNAVAILABLE", 70: "EX_SOFTWARE",
              71: "EX_OSERR", 72: "EX_OSFILE", 73: "EX_CANTCREAT", 74: "EX_IOERR",
              75: "EX_TEMPFAIL", 76: "EX_PROTOCOL", 77: "EX_NOPERM", 78: "EX_CONFIG"}
# sysexits(3) codes that mean "try again later"; EX_CONFIG too, so that a
# broken MTA configuration defers the queue instead of bouncing all of it.
TEMPORARY_EXITS = frozenset((69, 71, 73, 74, 75, 78))
REQUEST_KEYS = frozenset(("id", "sender", "hub", "mta", "offset", "length", "head"))


class BadRequest(Exception):
    pass


# -- the wire format between scanner and agent ----------------------------

def encode_request(message_id, sender, hub, mta, offset, length, head=None):
    request = {"id": message_id, "sender": sender, "hub": hub, "mta": mta,
               "offset": offset, "length": length,
               "head": None if head is None else head.decode("latin-1")}
    return json.dumps(request, separators=(",", ":")).encode("ascii")


def decode_request(data, fd, hub_enabled):
    """The checked request as a dict; raises BadRequest."""
    if len(data) > MAX_REQUEST:
        raise BadRequest("request too large")
    try:
        request = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("request is not JSON") from None
    if not isinstance(request, dict) or set(request) != REQUEST_KEYS:
        raise BadRequest("request keys are wrong")
    if not isinstance(request["id"], str) or not spool.valid_id(request["id"]):
        raise BadRequest("bad queue id")
    sender = request["sender"]
    if not isinstance(sender, str) or (sender and address.problem(sender)):
        raise BadRequest("bad sender")
    recipients = []
    for key in ("hub", "mta"):
        if not isinstance(request[key], list):
            raise BadRequest("recipients are not a list")
        for recipient in request[key]:
            if not isinstance(recipient, str) or \
                    address.problem(recipient, allow_bare_postmaster=True):
                raise BadRequest("bad recipient")
        recipients += request[key]
    if not 1 <= len(recipients) <= MAX_RECIPIENTS or len(set(recipients)) != len(recipients):
        raise BadRequest("wrong number of recipients")
    if request["hub"] and not hub_enabled:
        raise BadRequest("hub recipients but no mailhub")
    head = request["head"]
    if head is not None:
        if not isinstance(head, str) or len(head) > MAX_HEAD:
            raise BadRequest("bad head")
        try:
            request["head"] = head.encode("latin-1")
        except UnicodeEncodeError:
            raise BadRequest("bad head") from None
    offset, length = request["offset"], request["length"]
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise BadRequest("bad offset or length")
    info = os.fstat(fd)
    if not (info.st_mode & 0o170000 == 0o100000) or offset + length > info.st_size:
        raise BadRequest("offset and length do not fit the file")
    return request


def encode_result(message_id, outcomes):
    """outcomes: [(recipient, "ok"|"temp"|"perm", text)]."""
    data = json.dumps({"id": message_id, "outcomes": outcomes},
                      separators=(",", ":")).encode("ascii")
    if len(data) > MAX_RESULT:
        # texts are the only unbounded part; shorten them rather than lose the result
        outcomes = [(r, s, t[:100]) for r, s, t in outcomes]
        data = json.dumps({"id": message_id, "outcomes": outcomes}).encode("ascii")
    return data


def decode_result(data):
    """(id, outcomes) from the agent (the scanner checks them against its request)."""
    result = json.loads(data.decode("ascii"))
    outcomes = [(str(r), str(s), str(t)) for r, s, t in result["outcomes"]]
    return str(result["id"]), outcomes


# -- reading the message out of the spool file ----------------------------

def message_chunks(fd, request, line_feed):
    """The message's octets: the (rewritten) head, then the rest of the file part.

    With line_feed, CRLF becomes LF: the local convention sendmail expects.
    """
    position, end = request["offset"], request["offset"] + request["length"]
    head = request["head"]
    if head is not None:
        yield head.replace(b"\r\n", b"\n") if line_feed else head
        position += body_offset(fd, position, end)
    carry = b""
    while position < end:
        chunk = os.pread(fd, min(CHUNK, end - position), position)
        if not chunk:
            raise OSError(errno.EIO, "spool file shrank")
        position += len(chunk)
        if not line_feed:
            yield chunk
            continue
        chunk = carry + chunk
        carry = b""
        if chunk.endswith(b"\r") and position < end:
            chunk, carry = chunk[:-1], b"\r"
        yield chunk.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def body_offset(fd, start, end):
    """Length of the header section (with its blank line) at start."""
    head = os.pread(fd, min(end - start, MAX_HEAD + 4), start)
    if head.startswith(b"\r\n"):
        return 2
    mark = head.find(b"\r\n\r\n")
    return mark + 4 if mark >= 0 else len(head)


# -- one MTA run -----------------------------------------------------------

def run_mta(command, sender, recipients, chunks, timeout):
    """("ok"|"temp"|"perm", text) of one MTA run."""
    argv = list(command) + ["-oi", "-f", sender, "--"] + list(recipients)
    deadline = time.monotonic() + timeout
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, close_fds=True,
                                   start_new_session=True, env=MTA_ENVIRONMENT, cwd="/")
    except OSError as err:
        return "temp", "cannot run %s: %s" % (argv[0], err.strerror or err)
    errors = bytearray()
    stdin, stderr = process.stdin, process.stderr
    os.set_blocking(stdin.fileno(), False)
    pending = b""
    source = iter(chunks)
    writing = True
    timed_out = False
    try:
        while writing or stderr is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if writing and not pending:
                pending = next(source, None)
                if pending is None:
                    stdin.close()
                    writing = False
                    continue
            readers = [stderr] if stderr is not None else []
            writers = [stdin] if writing else []
            ready_read, ready_write, _ = select.select(readers, writers, [], min(remaining, 1.0))
            if ready_read:
                data = os.read(stderr.fileno(), 4096)
                if not data:
                    stderr.close()
                    stderr = None
                elif len(errors) < MAX_STDERR:
                    errors += data[:MAX_STDERR - len(errors)]
            if ready_write:
                try:
                    written = os.write(stdin.fileno(), pending[:CHUNK])
                    pending = pending[written:]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    # the MTA stopped reading: its exit code says why
                    writing = False
                    try:
                        stdin.close()
                    except OSError:
                        pass
        if not timed_out:
            try:
                status = process.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    except OSError as err:
        kill_group(process)
        return "temp", "reading the spool file: %s" % (err.strerror or err)
    if timed_out:
        kill_group(process)
        return "temp", "MTA timed out after %d seconds and was killed" % timeout
    return mta_outcome(status, bytes(errors))


def diagnostic(data, limit=MAX_DIAGNOSTIC):
    """One printable line of at most `limit` characters from untrusted
    diagnostic bytes (an MTA's stderr, a mail hub's reply): valid UTF-8 is
    kept (`Empfänger`), any other byte becomes `\\xNN` (a Latin-1 0xE4 stays
    visible, not dropped), control characters and line ends become spaces."""
    if isinstance(data, str):
        text = data[:4 * limit]
    else:
        text = bytes(data[:4 * limit]).decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:limit]


def mta_outcome(status, errors):
    """("ok"|"temp"|"perm", text) for the MTA's wait status and stderr bytes."""
    text = diagnostic(errors)
    if status < 0:
        return "temp", ("MTA killed by signal %d %s" % (-status, text)).strip()
    name = EXIT_NAMES.get(status, "exit %d" % status)
    if status == 0:
        return "ok", "MTA exit 0"
    kind = "temp" if status in TEMPORARY_EXITS else "perm"
    return kind, ("MTA exit %d %s %s" % (status, name, text)).strip()


def hub_outcome(code, reply):
    """(kind, text) for one mail hub reply code and its text (bytes or str)."""
    kind = "ok" if 200 <= code < 300 else "perm" if 500 <= code < 600 else "temp"
    return kind, "mailhub said %d %s" % (code, diagnostic(reply))


def kill_group(process):
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for stream in (process.stdin, process.stderr):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    process.wait()


# -- one mail hub transaction ---------------------------------------------

class HubTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise HubTimeout()


def deliver_hub(hub, helo, sender, recipients, message, timeout, hub_tls=None,
                fields=None, plaintext_retry=False):
    """[(recipient, kind, text)] of one SMTP transaction with the mail hub.
    hub_tls: the HubTLS of `mailhub-tls` (None: no STARTTLS); fields, a
    dict, gets the log fields of the TLS leg (tls=, cipher=, tls_error=);
    plaintext_retry: at `may`, a failed handshake is retried in clear on a
    new connection (the message has waited `retry` already, see
    HubTLS)."""
    host, port = hub
    fields = {} if fields is None else fields
    def everyone(kind, text):
        return [(r, kind, text) for r in recipients]
    def refusal(code, reply):
        # a refusal is never "ok", whatever code a confused hub gave with it
        kind, text = hub_outcome(code, reply)
        return ("temp" if kind == "ok" else kind), text
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    client = None
    try:
        client = smtplib.SMTP(host, port or 25, local_hostname=helo, timeout=timeout)
        client.ehlo_or_helo_if_needed()
        if hub_tls is not None and hub_tls.level != "none":
            try:
                start_hub_tls(client, hub_tls, host, timeout, fields)
            except HubTLSFailure as failure:
                fields["tls_error"] = failure.tls_error
                if not (failure.handshake and hub_tls.level == "may" and plaintext_retry):
                    return everyone("temp", failure.text)
                # Postfix's rule at `may`: a message that has waited once
                # already goes in clear to the same hub, on a new connection.
                client.close()
                client = None
                client = smtplib.SMTP(host, port or 25, local_hostname=helo, timeout=timeout)
                client.ehlo_or_helo_if_needed()
                fields["tls"] = "none"
                fields["tls_fallback"] = "plaintext after a failed handshake"
        options = ["BODY=8BITMIME"] if client.has_extn("8bitmime") else []
        refused = client.sendmail(sender, recipients, message, mail_options=options)
        outcomes = []
        for recipient in recipients:
            if recipient in refused:
                kind, text = refusal(*refused[recipient])
                outcomes.append((recipient, kind, text))
            else:
                outcomes.append((recipient, "ok", "mailhub accepted"))
        return outcomes
    except smtplib.SMTPRecipientsRefused as refused:
        return [(r,) + refusal(*refused.recipients.get(r, (451, b""))) for r in recipients]
    except smtplib.SMTPResponseException as err:
        return everyone(*refusal(err.smtp_code, err.smtp_error))
    except HubTimeout:
        return everyone("temp", "mailhub timed out after %d seconds" % timeout)
    except (OSError, smtplib.SMTPException) as err:
        return everyone("temp", "mailhub unreachable: %s" % diagnostic(str(err)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException, HubTimeout):
                client.close()


# -- TLS to the mail hub (mailhub-tls, Postfix's smtp_tls_security_level) --

class HubTLS:
    """The `mailhub-tls` level and its client context, made once in the agent.

    none: no STARTTLS.  may: STARTTLS when the hub's EHLO offers it, no
    certificate check; not offered, or refused with a reply, goes on in
    clear; a failed handshake defers the attempt, and a message that has
    waited `retry` seconds or more is then sent in clear on a new
    connection (Postfix's PLAINTEXT_FALLBACK_OK_AFTER_STARTTLS_FAILURE).
    encrypt: STARTTLS required, no certificate check.  verify: required,
    and the certificate must chain to mailhub-ca (or the system store) and
    name the mailhub host.  Whatever cannot meet encrypt or verify is a
    temporary failure: nothing goes in clear.  A context that could not be
    made (mailhub-ca unusable) leaves `error` set, and every hub delivery
    above `none` is then deferred with it."""

    def __init__(self, level, cafile=None):
        self.level = level
        self.context = None
        self.error = None
        if level == "none":
            return
        from common import tls      # ssl only where TLS is configured
        self.tls = tls
        try:
            tls.warm_up()
            self.context = tls.client_context(level == "verify", cafile)
        except tls.TLSFileError as err:
            self.error = str(err)

    @classmethod
    def from_config(cls, config):
        return cls(config.get("mailhub-tls") or "none", config.get("mailhub-ca"))


class HubTLSFailure(Exception):
    """The hub cannot meet the level: `text` for the outcome, `tls_error` for
    the log; `handshake` when the handshake itself failed."""

    def __init__(self, text, tls_error, handshake=False):
        super().__init__(text)
        self.text, self.tls_error, self.handshake = text, tls_error, handshake


def start_hub_tls(client, hub_tls, host, timeout, fields):
    """STARTTLS on an smtplib client after its EHLO, at hub_tls.level;
    returns with the client inside TLS (and a new EHLO done) or in clear
    where the level allows it; HubTLSFailure otherwise."""
    level = hub_tls.level
    required = level in ("encrypt", "verify")
    if hub_tls.error is not None:
        raise HubTLSFailure("mailhub-tls %s: %s" % (level, hub_tls.error), hub_tls.error)
    if not client.has_extn("starttls"):
        if required:
            raise HubTLSFailure("TLS is required (mailhub-tls %s), but the mail hub did not "
                                "offer STARTTLS" % level, "STARTTLS not offered")
        fields["tls"] = "none"
        return
    code, reply = client.docmd("STARTTLS")
    if code != 220:
        if required:
            raise HubTLSFailure("TLS is required (mailhub-tls %s), but the mail hub refused "
                                "STARTTLS: %d %s" % (level, code, diagnostic(reply)),
                                "STARTTLS refused: %d" % code)
        fields["tls"] = "none"
        return          # Postfix at `may`: go on in clear on this connection
    # Nothing the hub sent after its 220 and before the handshake may be
    # used (the STARTTLS injection class): smtplib's reader must be empty.
    if read_ahead(client):
        raise HubTLSFailure("the mail hub sent data after its 220 to STARTTLS, before the "
                            "TLS handshake", "plaintext after 220 to STARTTLS", handshake=True)
    tls = hub_tls.tls
    try:
        client.sock = tls.handshake(client.sock, hub_tls.context, host, timeout)
    except (OSError, ValueError) as err:      # ssl.SSLError is an OSError
        client.sock = None
        text = tls.describe_error(err)
        raise HubTLSFailure("TLS handshake with the mail hub failed: %s" % text, text,
                            handshake=True) from None
    # as smtplib.starttls: forget what the hub said in clear, EHLO again
    client.file = None
    client.helo_resp = client.ehlo_resp = None
    client.esmtp_features = {}
    client.does_esmtp = False
    fields.update(tls.session_fields(client.sock))
    code, reply = client.ehlo()
    if code != 250:
        raise HubTLSFailure("the mail hub refused EHLO after STARTTLS: %d %s"
                            % (code, diagnostic(reply)), "EHLO after STARTTLS refused")


def read_ahead(client):
    """Bytes smtplib's reader holds (or the socket has) now, without waiting."""
    reader = client.file
    if reader is None:
        return b""
    sock = client.sock
    previous = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return reader.peek(1) or b""
    except (BlockingIOError, OSError, ValueError):
        return b""
    finally:
        sock.settimeout(previous)


def queued_seconds(fd, now=None):
    """How long the message of an open spool file has been queued (0 when
    its envelope cannot be read: no plaintext retry for a doubtful file)."""
    try:
        envelope, _, _ = spool.locate(fd)
        return max(0.0, (time.time() if now is None else now) - envelope["arrival"])
    except (spool.SpoolError, OSError, KeyError, TypeError):
        return 0.0


# -- the agent process -----------------------------------------------------

class Agent:
    """Receives requests on `channel`, forks workers, reports their outcomes."""

    def __init__(self, channel, config, log, helo):
        self.channel = channel
        self.sendmail = config.get("sendmail")
        self.hub = config.get("mailhub")
        self.timeout = config.get("deliver-timeout")
        # The scanner keeps at most `maxchildren` deliveries in flight; a worker
        # that has reported may not have been reaped yet, so the agent's own
        # bound, a guard against a misbehaving scanner, leaves room for those.
        self.maxchildren = 2 * config.get("maxchildren")
        # A request that arrives while that bound is reached (workers that have
        # reported but not yet exited, on a loaded machine) waits here for a
        # worker to be reaped instead of being answered "agent busy": such an
        # answer is a temporary failure, and the scanner would defer a perfectly
        # deliverable message by `retry` (and `--once` would leave it behind).
        # Only more requests than a correct scanner ever has in flight are
        # refused as busy.
        self.maxwaiting = config.get("maxchildren")
        self.log = log
        self.helo = helo
        self.retry = config.get("retry")
        self.hub_tls = HubTLS.from_config(config) if self.hub is not None else None
        if self.hub_tls is not None and self.hub_tls.error:
            log.error("mailhub-tls", level=self.hub_tls.level, reason=self.hub_tls.error)
        self.children = {}          # pid -> queue id
        self.waiting = collections.deque()     # (request, fd) for a free slot

    def run(self):
        """Serve until the scanner closes its end, then let the workers finish."""
        skeleton.set_title("smapd: agent")
        # SIGTERM to the group must not cut deliveries short: the scanner
        # closes the channel when it stops, and that ends the agent.
        signals = skeleton.Signals({signal.SIGTERM: None, signal.SIGUSR1: signal.SIG_IGN,
                                    signal.SIGCHLD: None})
        open_channel = True
        while True:
            self.reap()
            while self.waiting and len(self.children) < self.maxchildren:
                self.start(*self.waiting.popleft())
            if not open_channel and not self.children:
                break
            watched = [signals] + ([self.channel] if open_channel else [])
            try:
                ready, _, _ = select.select(watched, [], [], 5.0)
            except InterruptedError:
                continue
            if signals in ready:
                signals.drain()
            if open_channel and self.channel in ready:
                open_channel = self.receive()
                if not open_channel:
                    self.drop_waiting()
        self.log.info("agent-stop")
        return 0

    def receive(self):
        try:
            data, fds, flags, _ = socket.recv_fds(self.channel, MAX_REQUEST + 1, 4)
        except InterruptedError:
            return True
        except OSError as err:
            self.log.error("agent-receive", reason=err.strerror or str(err))
            return False
        if not data and not fds:
            return False
        try:
            if flags & socket.MSG_TRUNC or len(fds) != 1:
                raise BadRequest("truncated request or not exactly one descriptor")
            request = decode_request(data, fds[0], self.hub is not None)
        except BadRequest as err:
            for fd in fds:
                os.close(fd)
            self.log.error("agent-refuse", reason=str(err))
            self.refuse(data, str(err))
            return True
        fd = fds[0]
        if len(self.children) >= self.maxchildren:
            if len(self.waiting) < self.maxwaiting:
                self.waiting.append((request, fd))
                return True
            os.close(fd)
            self.report(request["id"], [(r, "temp", "agent busy")
                                        for r in request["hub"] + request["mta"]])
            return True
        self.start(request, fd)
        return True

    def start(self, request, fd):
        """Fork the worker for one checked request; the worker owns fd from now on."""
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                for _, other in self.waiting:   # other claims are not this worker's to hold
                    os.close(other)
                status = self.work(request, fd)
            finally:
                os._exit(status)
        os.close(fd)
        self.children[pid] = request

    def drop_waiting(self):
        """The scanner has gone: nobody would record these outcomes, so the
        waiting requests are not delivered (their files stay queued)."""
        while self.waiting:
            request, fd = self.waiting.popleft()
            os.close(fd)
            self.log.notice("agent-drop", id=request["id"], reason="the scanner went away")

    def refuse(self, data, reason):
        """Answer a refused request so that the scanner does not wait for it."""
        try:
            request = json.loads(data.decode("ascii"))
            message_id = request["id"]
            recipients = request["hub"] + request["mta"]
            if not spool.valid_id(message_id) or len(recipients) > MAX_RECIPIENTS:
                return
            self.report(message_id, [(str(r), "temp", "agent refused: " + reason)
                                     for r in recipients])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass

    def report(self, message_id, outcomes):
        try:
            self.channel.send(encode_result(message_id, outcomes))
        except OSError as err:
            self.log.error("agent-report", id=message_id, reason=err.strerror or str(err))

    def reap(self):
        if self.children and not skeleton.reap_children(self.ended):
            self.children.clear()

    def ended(self, pid, status):
        request = self.children.pop(pid, None)
        if request is not None and status != 0:
            # the worker died before it could report: nothing is known
            self.log.error("worker-died", id=request["id"], status=status)
            self.report(request["id"], [(r, "temp", "delivery process died")
                                        for r in request["hub"] + request["mta"]])

    def work(self, request, fd):
        """In the worker: deliver, report, exit 0 (any other exit means 'died')."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        message_id = request["id"]
        skeleton.set_title("smapd: delivering %s" % message_id)
        outcomes = []
        if request["hub"]:
            message = b"".join(message_chunks(fd, request, line_feed=False))
            tls_fields = {}
            retry_plain = self.retry is not None and queued_seconds(fd) >= self.retry
            outcomes += deliver_hub(self.hub, self.helo, request["sender"], request["hub"],
                                    message, self.timeout, self.hub_tls, tls_fields,
                                    retry_plain)
            self.log_outcomes(message_id, "mailhub", outcomes, **tls_fields)
        if request["mta"]:
            kind, text = run_mta(self.sendmail, request["sender"], request["mta"],
                                 message_chunks(fd, request, line_feed=True), self.timeout)
            mta = [(r, kind, text) for r in request["mta"]]
            self.log_outcomes(message_id, "sendmail", mta)
            outcomes += mta
        os.close(fd)
        self.report(message_id, outcomes)
        return 0

    def log_outcomes(self, message_id, via, outcomes, **fields):
        for kind in ("ok", "temp", "perm"):
            group = [(r, t) for r, k, t in outcomes if k == kind]
            if group:
                event = {"ok": "delivered", "temp": "deferred", "perm": "failed"}[kind]
                log = self.log.info if kind == "ok" else self.log.notice
                log(event, id=message_id, via=via,
                    to=",".join("<%s>" % r for r, _ in group), reason=group[0][1], **fields)
