"""The scanner: smapd's chrooted, unprivileged main process (DESIGN §6, §7).

It owns the queue.  It wakes every `wakeup` seconds, at once when smap
pokes the trigger FIFO (held open O_RDWR so it never sees end-of-file),
and on SIGUSR1 (`smapd --flush`, which also retries deferred mail now).
For each message in queue/ it takes an exclusive flock on an open
descriptor and checks by name that the file is still the one it opened,
reads the delivery state, parses and checks the untrusted spool content
(common.spool, smapd.checks), and hands the descriptor with a small
request to the agent.  The agent's outcome decides: delivered → file
removed; temporary → state saved, retried after `retry`, bounced after
`maxage`; permanent → bounce (smapd.bounce).  Files that fail the checks
are moved to `baddir` with a reason file and the postmaster hears of it;
so are messages that smap marked for the quarantine (a `quarantine REASON`
envelope field: a milter's verdict), as soon as the scanner sees them.
A bounce is committed to the spool before the original is removed, so a
crash can duplicate a notice but never lose a message.  What happens after
an attempt is decided by the pure functions of smapd.decide; this module
carries the decisions out.

One message never stops the queue: everything done for one message
(claim, consider, settle, complete) runs under one guard, `handle`.  An
unexpected exception there quarantines that message with the exception
as its reason (with the recipients already delivered, so that nobody
sends them a second copy) and the scanner goes on.  An OSError (a full
disk, an I/O error) may pass, so the message is left for a later scan, at
most MAX_TROUBLES times with a growing pause, before it is quarantined
too; a quarantine that fails leaves the message for a later scan with the
same pause and a log line, never a loop.

It trusts the agent's answers only for the message ids and recipients it
asked about.

With `metrics-file`, it counts what it does (smapd.metrics) and writes
the metrics at every scan, at most once a second.
"""

import collections
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import time

from common import address, skeleton, spool
from smapd import agent, bounce, checks, decide, state

SWEEP_INTERVAL = 3600
SYNC_DELAY = 0.1        # seconds a removal from queue/ may wait for the next fsync of queue/
LOST_MARGIN = 60        # seconds beyond 2 × deliver-timeout after which a request counts as lost
MAX_TROUBLES = 3        # failed handlings (OSError) of one message before its quarantine
TROUBLE_PAUSE = 30      # seconds before a failed message is looked at again, doubled each time
MAX_TROUBLE_PAUSE = 3600
MAX_TROUBLE_TEXT = 300  # characters of an exception kept as a reason


class Flight:
    """A message the agent is delivering: its descriptor keeps the claim."""

    def __init__(self, fd, envelope, record, header, targets, started):
        self.fd = fd
        self.envelope = envelope
        self.state = record
        self.header = header
        self.targets = targets          # delivered address -> [envelope recipients]
        self.started = started


class Scanner:
    def __init__(self, base, config, log, channel, trigger_fd, reporting_mta,
                 baddir, once=False, metrics=None):
        self.base = base
        self.log = log
        self.channel = channel
        self.trigger_fd = trigger_fd
        self.reporting_mta = reporting_mta
        self.baddir = baddir
        self.once = once
        self.wakeup = config.get("wakeup")
        self.retry = config.get("retry")
        self.maxage = config.get("maxage")
        self.maxchildren = config.get("maxchildren")
        self.deliver_timeout = config.get("deliver-timeout")
        self.postmaster = config.get("postmaster")
        self.hub = config.get("mailhub")
        self.accept_domains = config.get("accept-domains") or []
        self.shorten_domains = config.get("shorten-domain") or []
        self.inflight = {}
        self.attempted = set()
        self.rescan = True
        self.todo = collections.deque()     # names of the last scan not yet looked at
        self.todo_force = False
        self.flush = False
        self.stopping = False
        self.earliest_due = None
        self.last_sweep = 0.0
        self.unsynced = []              # removed from queue/, removal not yet fsync'ed
        self.unsynced_since = 0.0
        self.troubles = {}              # name -> (failed handlings, not before) (see handle)
        self.metrics = metrics          # smapd.metrics.Metrics, or None
        self.seen = set()               # names counted as received (metrics)

    # -- signals -------------------------------------------------------------
    def on_term(self):
        self.stopping = True

    def on_flush(self):
        self.flush = True
        self.rescan = True

    # -- the loop ------------------------------------------------------------
    def run(self):
        skeleton.set_title("smapd: scanner")
        signals = skeleton.Signals({signal.SIGTERM: self.on_term, signal.SIGINT: self.on_term,
                                    signal.SIGUSR1: self.on_flush, signal.SIGHUP: self.on_flush})
        state.sweep_orphans(self.base)
        try:
            return self.loop(signals.fileno())
        finally:
            self.sync_removals()
            self.write_metrics(force=True)

    def loop(self, wake_read):
        next_scan = 0.0
        status = 0
        while True:
            if self.stopping and not self.inflight:
                break
            self.expire_lost()
            now = time.monotonic()
            if self.once and not self.inflight:
                self.rescan = True      # --once: look again once everything has settled
            if not self.stopping and (self.rescan or now >= next_scan):
                self.rescan = False
                dispatched = self.scan()
                next_scan = time.monotonic() + self.wakeup
                if self.once and not dispatched and not self.inflight and not self.rescan:
                    break
            timeout = max(0.0, next_scan - time.monotonic())
            if self.earliest_due is not None:
                timeout = min(timeout, max(0.05, self.earliest_due - time.time()))
            if self.unsynced:
                waited = time.monotonic() - self.unsynced_since
                if not self.inflight or waited >= SYNC_DELAY:
                    self.sync_removals()
                else:
                    timeout = min(timeout, SYNC_DELAY - waited)
            if self.metrics is not None and self.metrics.wait() is not None:
                timeout = min(timeout, self.metrics.wait())
            if self.rescan:
                timeout = 0.0
            watched = [wake_read, self.channel] + ([self.trigger_fd] if self.trigger_fd is not None else [])
            try:
                ready, _, _ = select.select(watched, [], [], min(timeout, 5.0))
            except InterruptedError:
                continue
            if wake_read in ready:
                skeleton.drain(wake_read)
            if self.trigger_fd is not None and self.trigger_fd in ready:
                skeleton.drain(self.trigger_fd)
                self.rescan = True
            if self.channel in ready and not self.receive():
                self.log.error("agent-lost", reason="the delivery agent went away",
                               inflight=len(self.inflight))
                status = 1
                break
            if self.todo and not self.stopping and not self.rescan:
                # a slot is free: go on with the names of the last scan at once
                # (re-listing queue/ for every settled delivery costs O(queue))
                self.dispatch()
            self.write_metrics()
        self.log.info("stop", inflight=len(self.inflight))
        return status

    def receive(self):
        try:
            data = self.channel.recv(agent.MAX_RESULT + 1)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            return False
        try:
            message_id, outcomes = agent.decode_result(data)
        except (ValueError, KeyError, TypeError):
            self.log.error("agent-result", reason="unreadable result from the agent")
            return True
        flight = self.inflight.pop(message_id, None)
        if flight is None:
            return True
        try:
            self.handle(message_id, self.settle, message_id, flight,
                        dict((r, (k, t)) for r, k, t in outcomes), flight=flight)
        finally:
            os.close(flight.fd)
        return True

    def expire_lost(self):
        limit = 2 * self.deliver_timeout + LOST_MARGIN
        now = time.monotonic()
        for message_id, flight in list(self.inflight.items()):
            if now - flight.started > limit:
                del self.inflight[message_id]
                try:
                    self.handle(message_id, self.settle, message_id, flight, {}, flight=flight)
                finally:
                    os.close(flight.fd)

    # -- scanning ------------------------------------------------------------
    def scan(self):
        """One pass over queue/; returns how many messages were handed over."""
        now = time.time()
        if now - self.last_sweep > SWEEP_INTERVAL:
            self.last_sweep = now
            failures = []
            swept = spool.sweep_tmp(self.base, failures=failures)
            for name, reason in failures:
                # skipped, tried again at the next sweep: it must not stop the queue
                self.log.error("sweep", file=state.one_line(name)[:80],
                               reason=state.one_line(reason))
            for name in swept:
                self.log.notice("sweep", id=name, reason="stale temporary file removed")
        # names a flush left over in the last scan are flushed in this one too
        self.todo_force = self.flush or (self.todo_force and bool(self.todo))
        self.flush = False
        self.earliest_due = None
        self.todo = collections.deque(spool.queued(self.base))
        if self.troubles:       # forget failures of messages that are gone
            listed = set(self.todo)
            self.troubles = {n: t for n, t in self.troubles.items() if n in listed}
        if self.seen:
            self.seen &= set(self.todo)
        dispatched = self.dispatch(now)
        if self.metrics is not None:
            self.metrics.scanned()
            self.write_metrics()
        return dispatched

    def dispatch(self, now=None):
        """Hand over names of the last scan while a slot is free; returns how many.

        The names stay those of the scan: the claim checks each one again
        (gone, busy or replaced since are skipped), and messages that arrive
        meanwhile come with the next scan (the trigger, SIGUSR1, `wakeup`).
        """
        now = time.time() if now is None else now
        force = self.todo_force
        dispatched = 0
        while self.todo and len(self.inflight) < self.maxchildren:
            name = self.todo.popleft()
            if name in self.inflight or (self.once and name in self.attempted):
                continue
            if self.troubled(name, now):
                continue
            fd = self.handle(name, self.claim, name)
            if fd is None:
                continue
            handed = self.handle(name, self.consider, name, fd, now, force)
            if handed:
                dispatched += 1
            elif name not in self.inflight:     # the agent has it: settle closes fd
                os.close(fd)
        return dispatched

    # -- the guard around one message --------------------------------------------
    def handle(self, name, step, *args, flight=None):
        """step(*args) for message `name`; on an exception: trouble, then None."""
        try:
            return step(*args)
        except Exception as err:        # one message must never stop the queue
            self.trouble(name, err, flight)
            return None

    def troubled(self, name, now):
        """Whether `name` failed lately and waits out its pause."""
        count, not_before = self.troubles.get(name, (0, 0.0))
        if not count or now >= not_before:
            return False
        if self.earliest_due is None or not_before < self.earliest_due:
            self.earliest_due = not_before
        return True

    def trouble(self, name, error, flight=None):
        """Handling `name` raised `error`: quarantine it, or leave it for later."""
        reason = state.one_line("%s: %s" % (type(error).__name__, error))[:MAX_TROUBLE_TEXT]
        count = self.troubles.get(name, (0, 0.0))[0] + 1
        self.attempted.add(name)        # --once does not try it again in this run
        self.log.error("failure", id=name, reason=reason, failures=count)
        if name in self.inflight:
            return      # the agent is delivering it: its outcome settles it
        record = flight.state if flight is not None else None
        envelope = flight.envelope if flight is not None else None
        if not (isinstance(error, OSError) and count < MAX_TROUBLES):
            try:
                known = record if record is not None else state.load(self.base, name)
                self.quarantine_path(name, "smapd could not handle it: " + reason,
                                     envelope, record=known)
                self.troubles.pop(name, None)
                return
            except Exception as err:
                self.log.error("quarantine-failed", id=name,
                               reason=state.one_line("%s: %s" % (type(err).__name__, err)))
        if record is not None:
            # keep what the agent did, so that a later attempt does not send it again
            try:
                if os.path.lexists(os.path.join(self.base, spool.QUEUE, name)):
                    state.save(self.base, name, record)
            except Exception as err:
                self.log.error("state", id=name, reason=state.one_line(str(err)))
        pause = min(MAX_TROUBLE_PAUSE, TROUBLE_PAUSE * 2 ** min(count - 1, 10))
        self.troubles[name] = (count, time.time() + pause)
        self.log.notice("later", id=name, retry=pause)

    def claim(self, name):
        """An open, flocked descriptor of queue/name, or None (busy or gone)."""
        path = os.path.join(self.base, spool.QUEUE, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                self.quarantine_path(name, "not a regular file (symbolic link)")
            else:
                self.log.error("spool", id=name, reason=err.strerror)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # a worker of an earlier scanner still delivers it: look again soon
            os.close(fd)
            soon = time.time() + 1
            self.earliest_due = soon if self.earliest_due is None else min(self.earliest_due, soon)
            return None
        try:
            opened = os.fstat(fd)
            named = os.lstat(path)
        except OSError:
            os.close(fd)
            return None
        if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
            os.close(fd)        # renamed or replaced while we locked it
            return None
        if not stat.S_ISREG(opened.st_mode):
            os.close(fd)
            self.quarantine_path(name, "not a regular file")
            return None
        return fd

    def consider(self, name, fd, now, force):
        """Check one claimed message and hand it to the agent; False to let it go."""
        record = state.load(self.base, name)
        if not decide.is_due(record, now, force):
            if self.earliest_due is None or record.next_try < self.earliest_due:
                self.earliest_due = record.next_try
            return False
        self.attempted.add(name)
        try:
            envelope, offset, length = spool.locate(fd)
        except spool.SpoolError as err:
            self.quarantine_path(name, str(err))
            return False
        if envelope["id"] != name:
            self.quarantine_path(name, "queue id in the file does not match its name")
            return False
        if envelope.get("quarantine"):
            # smap's mark (a policy hook such as a milter said quarantine):
            # the jailed smap cannot reach baddir, so smapd moves it now.
            self.quarantine_path(name, "smap: %s" % envelope["quarantine"], envelope)
            return False
        self.note_arrival(name, envelope, length, record)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            self.quarantine_path(name, "file shorter than its end marker says")
            return False
        reason = checks.problem_of(envelope, data)
        if reason:
            self.quarantine_path(name, reason, envelope)
            return False
        header, _ = checks.split_message(data)
        pending = record.pending(envelope["rcpt"])
        flight = Flight(fd, envelope, record, header, {}, time.monotonic())
        if not pending:
            # everything was settled before a crash; only the removal is missing
            self.complete(name, flight)
            return False
        for recipient in pending:
            target = self.postmaster if recipient.lower() == "postmaster" else recipient
            if target in flight.targets or len(flight.targets) < agent.MAX_RECIPIENTS:
                flight.targets.setdefault(target, []).append(recipient)
        hub = [t for t in flight.targets
               if self.hub is not None and address.in_domains(t, self.accept_domains)]
        mta = [t for t in flight.targets if t not in hub]
        head = None
        if self.shorten_domains:
            shortened = checks.shorten(header, self.shorten_domains)
            head = shortened if shortened != header else None
        request = agent.encode_request(name, envelope["sender"], hub, mta, offset, length, head)
        if len(request) > agent.MAX_REQUEST and head is not None:
            self.log.warning("shorten", id=name, reason="header too large to rewrite")
            request = agent.encode_request(name, envelope["sender"], hub, mta, offset, length)
        socket.send_fds(self.channel, [request], [fd])
        self.inflight[name] = flight
        self.log.info("deliver", id=name, attempt=record.attempts + 1,
                      **{"from": "<%s>" % envelope["sender"]},
                      to=",".join("<%s>" % t for t in flight.targets))
        return True

    # -- outcomes --------------------------------------------------------------
    def settle(self, name, flight, outcomes):
        """Record the agent's outcomes and carry out what smapd.decide says."""
        envelope = flight.envelope
        record, action = decide.settle(
            flight.state, envelope["rcpt"], flight.targets, outcomes, envelope["arrival"],
            time.time(), self.retry, self.maxage, envelope["sender"],
            self.is_notice(flight), self.postmaster)
        flight.state = record       # the guard keeps it if what follows fails
        self.note_outcomes(flight.targets, outcomes)
        if action.kind == decide.RETRY:
            state.save(self.base, name, record)
            self.log.notice("defer", id=name, attempts=record.attempts,
                            reason=record.last_error, retry=self.retry)
        elif action.kind == decide.NEXT:
            state.save(self.base, name, record)
            self.attempted.discard(name)    # --once goes on with the next batch too
            self.rescan = True
        else:
            self.carry_out(name, flight, action)
        self.troubles.pop(name, None)

    def is_notice(self, flight):
        return not flight.envelope["sender"] and bounce.is_notice(flight.header)

    def complete(self, name, flight):
        """Every recipient is settled: bounce the failures, then remove the file."""
        record = flight.state
        self.carry_out(name, flight, decide.finish(record, flight.envelope["sender"],
                                                   self.is_notice(flight), self.postmaster))

    def carry_out(self, name, flight, action):
        """A final action (bounce, quarantine, done) for a settled message."""
        record = flight.state
        if action.kind == decide.QUARANTINE:
            self.quarantine_path(name, action.reason, flight.envelope, tell=False,
                                 record=record)
            return
        if action.kind == decide.BOUNCE:
            data = bounce.build_bounce(self.reporting_mta, flight.envelope, flight.header,
                                       action.failures, action.to)
            new_id = self.inject([action.to], data)
            self.count("bounces")
            self.log.notice("bounce", id=name, bounce_id=new_id, to="<%s>" % action.to,
                            failed=",".join("<%s>" % r for r, _, _ in action.failures))
        os.unlink(os.path.join(self.base, spool.QUEUE, name))
        self.troubles.pop(name, None)
        # The fsync of queue/ that makes the removal durable (and only then the
        # removal of the state file) is shared by the removals of SYNC_DELAY
        # seconds (sync_removals): a crash before it brings the message back,
        # to be delivered again, as a crash between delivery and removal does.
        if not self.unsynced:
            self.unsynced_since = time.monotonic()
        self.unsynced.append(name)
        self.log.info("done", id=name, attempts=record.attempts,
                      delivered=len(record.done), failed=len(record.failed))

    def sync_removals(self):
        """fsync queue/ for the removals since the last call, then drop their state."""
        if not self.unsynced:
            return
        spool.fsync_dir(os.path.join(self.base, spool.QUEUE))
        names, self.unsynced = self.unsynced, []
        for name in names:
            state.remove(self.base, name)

    def inject(self, recipients, data):
        """Spool a message of our own (a bounce or a notice), sender <>."""
        new_id = spool.new_id()
        writer = spool.MessageWriter(self.base, new_id)
        try:
            writer.start({"id": new_id, "arrival": "%.6f" % time.time(),
                          "client-addr": "127.0.0.1", "client-name": "localhost",
                          "helo": "smapd", "sender": "", "rcpt": list(recipients),
                          "size": len(data)})
            writer.write(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.rescan = True
        return new_id

    # -- metrics (smapd.metrics) -------------------------------------------------
    def count(self, key, amount=1):
        if self.metrics is not None:
            self.metrics.count(key, amount)

    def note_arrival(self, name, envelope, length, record):
        """Count a message smap accepted, the first time the scanner looks at it."""
        if self.metrics is None or record.attempts or name in self.seen:
            return
        self.seen.add(name)
        if not envelope["sender"] and envelope.get("helo") == "smapd" \
                and envelope.get("client-name") == "localhost":
            return      # a notice of our own (inject)
        self.count("received_messages")
        self.count("received_bytes", length)

    def note_outcomes(self, targets, outcomes):
        for target in targets:
            kind = outcomes.get(target, ("temp", ""))[0]
            self.count("deliveries_" + (kind if kind in ("ok", "perm") else "temp"))

    def write_metrics(self, force=False):
        if self.metrics is not None:
            self.metrics.write(len(self.inflight), force)

    # -- quarantine --------------------------------------------------------------
    def quarantine_path(self, name, reason, envelope=None, tell=True, record=None):
        """Move queue/name to baddir with name.reason beside it; tell the postmaster.

        With the delivery state `record`, the reason file also says which
        recipients were delivered already and which failed, so that whoever
        sends the message on does not send it twice.
        """
        source = os.path.join(self.base, spool.QUEUE, name)
        target = os.path.join(self.baddir, name)
        suffix = 0
        while os.path.lexists(target) or os.path.lexists(target + ".reason"):
            suffix += 1
            target = os.path.join(self.baddir, "%s.%d" % (name, suffix))
        text = "queue id: %s\nreason: %s\nquarantined: %s\n" % (
            name, reason, time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime()))
        if envelope is not None:
            text += "sender: <%s>\nrecipients: %s\n" % (
                envelope["sender"], " ".join("<%s>" % r for r in envelope["rcpt"][:100]))
        if record is not None and (record.done or record.failed):
            text += "delivered: %s\n" % " ".join("<%s>" % r for r in record.done[:1000])
            text += "".join("failed: <%s> %s\n" % (r, state.one_line(why))
                            for r, why in record.failed[:1000])
        fd = os.open(target + ".reason", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode("utf-8", "replace"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(source, target)
        spool.fsync_dir(self.baddir)
        spool.fsync_dir(os.path.join(self.base, spool.QUEUE))
        state.remove(self.base, name)
        self.count("quarantined")
        self.log.warning("quarantine", id=name, reason=reason,
                         file=os.path.basename(target))
        if not tell:
            return
        try:
            notice = bounce.build_notice(
                self.reporting_mta, self.postmaster,
                "mailwall: message %s quarantined" % name,
                "smapd on %s moved message %s to the quarantine (%s).\n\n%s" % (
                    self.reporting_mta, name, os.path.basename(target), text))
            new_id = self.inject([self.postmaster], notice)
        except Exception as err:
            # the message is safe in the quarantine; only the notice is lost
            self.log.error("notice", id=name, reason=state.one_line(
                "%s: %s" % (type(err).__name__, err)))
            return
        self.log.notice("notice", id=name, notice_id=new_id, to="<%s>" % self.postmaster)

