"""smap --daemon's accept loop: pre-forked session processes that each
serve up to `maxuse` connections, one at a time, after Postfix's master(8).

Imported only by the --daemon code (smap under inetd starts a fresh
interpreter per connection and must not pay for it).

The root parent alone holds the listening socket (DESIGN §3: a session
process holds its client's socket, never the listener).  It accepts each
connection and passes it to an idle worker over that worker's own
socketpair (SCM_RIGHTS), then closes its copy; the worker says on the
same socketpair when it is ready for a connection (after its set-up and
after each connection) or that it is leaving.  The parent never reads a
client byte, and from a worker it takes only those one-byte messages, in
the order the protocol allows: anything else ends that worker (SIGKILL).
One socketpair per worker, so no worker can speak for another.  The
parent reaps, enforces `maxuse` itself, retires workers idle too long,
and answers `busy_reply` itself when all `maxchildren` are busy.

Right after the fork a worker closes every descriptor of the parent's (the
listener, the other workers' socketpairs, the signal pipe, the poller),
keeping fd 0-2, its socketpair and the log's socket; the caller's
`prepare()` then jails it before it is given its first connection.
"""

import os
import select
import signal
import socket
import time

from common import skeleton
from common.skeleton import silence_stderr, set_title


# A worker's state, as the parent sees it.
STARTING = "starting"           # forked; not ready yet (counts as a spare)
IDLE = "idle"                   # said it is ready: may be given a connection
BUSY = "busy"                   # was given one
ENDED = "ended"                 # its socketpair is closed; counts until reaped
LEAVING = "leaving"             # served its last one: a replacement may start now

# The messages on a worker's socketpair (SOCK_SEQPACKET: one byte each, kept apart).
CONNECTION = b"c"               # parent -> worker, with the connection's descriptor
READY = b"r"                    # worker -> parent: give me a connection
DONE = b"d"                     # worker -> parent: finished my last connection, exiting

WORKER_IDLE_EXIT = 100.0        # an idle worker leaves after this many seconds (Postfix max_idle)
RESPAWN_PAUSE = 1.0             # after a worker that was not ready, wait this long
NOT_READY = 3                   # the exit status of such a worker
REFUSE_GRACE = 0.05             # seconds to wait for a slot before answering 421
SPARE_DESCRIPTORS = 64          # the parent's own, besides one per worker


class Worker:
    """What a pool process needs to serve connections: `handle()` runs one
    connection on fd 0/1 (the same path as inetd mode from the peer lookup
    on) and returns its status; `ready` says whether prepare succeeded
    (a worker that could not jail itself only refuses connections);
    `exhausted` that it must serve no further connection; `close()` ends
    the worker's helpers."""

    ready = True
    exhausted = False

    def handle(self):
        raise NotImplementedError

    def refuse(self):
        """The answer of a worker that is not ready (one connection, then exit)."""

    def close(self):
        pass


class _Slot:
    """The parent's view of one worker: its pid, the parent's end of its
    socketpair (None once closed), its state, the connections it was given
    and since when it is in its state."""

    __slots__ = ("pid", "control", "state", "served", "since", "generation")

    def __init__(self, pid, control, generation=0):
        self.pid, self.control = pid, control
        self.state, self.served, self.since = STARTING, 0, time.monotonic()
        self.generation = generation    # the reloads (SIGHUP) before its fork


class WorkerPool:
    """The accept loop of smap --daemon: the parent accepts and hands each
    connection to an idle worker; each worker serves up to `maxuse`
    connections, one at a time, before it exits; the parent keeps `spare`
    idle workers ready (never more than `maxchildren` in all), answers
    `busy_reply` itself when all `maxchildren` are busy, reaps, and stops
    on SIGTERM (the port closes at once; idle workers leave at once, busy
    ones after their connection).  Forking per connection costs smap more
    CPU than the whole SMTP session; a worker pays for its fork once per
    `maxuse` connections.

    `prepare()` is called once in each new worker, still as root: it jails
    the process and returns a Worker.  What the pool trusts: nothing from
    a worker but a one-byte READY or DONE when the protocol expects one.
    """

    def __init__(self, listener, prepare, log, maxchildren, maxuse, busy_reply=b"",
                 title="daemon", idle_title="idle", spare=1, on_reload=None):
        self.listener = listener
        # SIGHUP: on_reload() in the parent (smap: new certificates), then
        # every worker forked before it is retired: idle ones at once, busy
        # ones when their connection is over (nothing in progress is cut).
        self.on_reload = on_reload
        self.reload_asked = False
        self.generation = 0
        self.prepare = prepare
        self.log = log
        self.maxchildren = maxchildren
        self.maxuse = maxuse
        self.busy_reply = busy_reply
        self.title = title
        self.idle_title = idle_title
        self.spare = max(1, min(spare, maxchildren))
        self.workers = {}           # pid -> _Slot
        self.by_control = {}        # fd of the parent's end -> _Slot
        self.idle_slots = {}        # pid -> _Slot, oldest first (handed out newest first)
        self.counts = dict.fromkeys((STARTING, IDLE, BUSY, ENDED, LEAVING), 0)
        self.stopping = False
        self.pause_until = 0.0
        self.poller = None
        self.signals = None
        self.watching = False

    def stop(self):
        self.stopping = True

    def ask_reload(self):
        self.reload_asked = True

    def reload(self):
        """SIGHUP: the caller's on_reload(), then a new generation of workers
        (forked from the parent as it is now); the old ones are retired."""
        self.reload_asked = False
        if self.on_reload is not None:
            self.on_reload()
        self.generation += 1
        for slot in list(self.idle_slots.values()):
            self.retire(slot)

    # -- counting ------------------------------------------------------------
    def active(self):
        """Workers that hold or may take a connection (not those on their way out)."""
        return len(self.workers) - self.counts[LEAVING]

    def spares(self):
        """Workers that count as spares: ready, starting, or ended and not
        yet reaped (the exit status of one that was not ready must be seen
        before its replacement is forked)."""
        return self.counts[IDLE] + self.counts[STARTING] + self.counts[ENDED]

    def full(self):
        """Every slot is taken by a busy worker: nobody will take a connection soon."""
        return self.active() >= self.maxchildren and not self.counts[IDLE] \
            and not self.counts[STARTING]

    def set_state(self, slot, state):
        self.counts[slot.state] -= 1
        self.counts[state] += 1
        if slot.state == IDLE:
            del self.idle_slots[slot.pid]
        if state == IDLE:
            self.idle_slots[slot.pid] = slot
        slot.state, slot.since = state, time.monotonic()

    # -- the loop ------------------------------------------------------------
    def run(self):
        self.signals = skeleton.Signals({
            signal.SIGTERM: self.stop, signal.SIGINT: self.stop,
            signal.SIGCHLD: None, signal.SIGHUP: self.ask_reload})
        self.listener.setblocking(False)
        self.poller = select.epoll()
        self.poller.register(self.signals.fileno(), select.EPOLLIN)
        raise_descriptor_limit(self.maxchildren + SPARE_DESCRIPTORS)
        set_title(self.title)
        try:
            while not self.stopping:
                self.reap()
                if self.reload_asked:
                    self.reload()
                now = time.monotonic()
                self.retire_idle(now)
                while (self.active() < self.maxchildren and self.spares() < self.spare
                       and now >= self.pause_until and not self.stopping):
                    if not self.spawn():
                        break
                # a connection waits in the kernel's queue while a worker starts
                self.watch_listener(self.counts[IDLE] > 0 or self.full())
                timeout = 5.0 if now >= self.pause_until else self.pause_until - now
                if self.dispatch(self.poller.poll(timeout)) and not self.stopping:
                    self.take_connections()
        finally:
            self.signals.close()
            self.listener.close()   # the port closes now, whoever is still busy
            for slot in self.workers.values():
                try:
                    os.kill(slot.pid, signal.SIGTERM)   # idle: leave; busy: finish
                except OSError:
                    pass
                # and should a signal be missed, end of file says the same
                self.close_control(slot)
            self.poller.close()
        self.log.info("stop", children=len(self.workers))

    def watch_listener(self, wanted):
        if wanted != self.watching:
            if wanted:
                self.poller.register(self.listener.fileno(), select.EPOLLIN)
            else:
                self.poller.unregister(self.listener.fileno())
            self.watching = wanted

    def dispatch(self, events):
        """Handle what poll() reported; True when the listener is readable."""
        listener_ready = False
        listener_fd = self.listener.fileno()
        for fd, _ in events:
            if fd == self.signals.fileno():
                self.signals.drain()
            elif fd == listener_fd:
                listener_ready = True
            else:
                slot = self.by_control.get(fd)
                if slot is not None:
                    self.hear(slot)
        return listener_ready

    def take_connections(self):
        """The listener is readable: hand connections to idle workers, or
        answer busy_reply when all maxchildren are busy."""
        if not self.counts[IDLE]:
            if not self.full():
                return          # a worker is starting or may start: the client waits for it
            # A client that connects as soon as it has read the last reply
            # of the session before it often finds that session's worker not
            # yet ready again or gone: give the workers a moment to say so
            # before answering 421.
            self.watch_listener(False)
            deadline = time.monotonic() + REFUSE_GRACE
            while self.full() and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.dispatch(self.poller.poll(left))
                self.reap()
            if self.stopping:
                return
            if self.full():
                self.refuse_one()
                return
        while self.counts[IDLE]:
            conn = skeleton.accept(self.listener, self.log)
            if conn is None:
                return
            self.hand_over(conn)

    def hand_over(self, conn):
        """Pass conn to the idle worker that became idle last (it is warm),
        then close the parent's copy."""
        try:
            while self.idle_slots:
                slot = self.idle_slots[next(reversed(self.idle_slots))]
                try:
                    socket.send_fds(slot.control, [CONNECTION], [conn.fileno()])
                except OSError:
                    self.end(slot)              # it died, or will not take it
                    continue
                self.set_state(slot, BUSY)
                slot.served += 1
                return
            self.log.warning("busy", children=len(self.workers), reason="no session process")
            skeleton.refuse(conn, self.busy_reply)
        finally:
            conn.close()

    def hear(self, slot):
        """One message from a worker: READY or DONE when its state allows
        it, end of file; anything else ends the worker."""
        try:
            message = slot.control.recv(2)      # plain recv: any descriptors sent are dropped
        except BlockingIOError:
            return
        except OSError:
            message = b""
        if not message:
            # End of file: a worker closes its end only by exiting, so this
            # one is on its way out; an empty message from one that is not
            # must not leave a process that counts as a spare: both end.
            self.end(slot)
            return
        if message == READY and slot.state in (STARTING, BUSY):
            if slot.served >= self.maxuse or slot.generation != self.generation:
                self.retire(slot)               # maxuse is the parent's to count
            else:
                self.set_state(slot, IDLE)
        elif message == DONE and slot.state == BUSY:
            # the parent may start a replacement now, before this one is
            # reaped (one that was not ready says nothing: paced by its exit)
            self.retire(slot)
        else:
            self.log.warning("worker", pid=slot.pid, state=slot.state,
                             reason="unexpected message; killed")
            self.end(slot)

    def end(self, slot):
        """No further word from this worker: close its socketpair and kill
        it (an exiting process keeps its exit status; SIGKILL is ignored
        then).  It counts until it is reaped."""
        self.close_control(slot)
        try:
            os.kill(slot.pid, signal.SIGKILL)   # our unreaped child: the pid is its
        except OSError:
            pass

    def retire(self, slot):
        """The worker gets no further connection: end of file tells it to leave."""
        self.close_control(slot, LEAVING)

    def close_control(self, slot, state=ENDED):
        if slot.control is not None:
            if slot.state != LEAVING:
                self.set_state(slot, state)
            del self.by_control[slot.control.fileno()]
            self.poller.unregister(slot.control)
            slot.control.close()
            slot.control = None

    def retire_idle(self, now):
        while self.idle_slots:
            oldest = self.idle_slots[next(iter(self.idle_slots))]
            if now - oldest.since < WORKER_IDLE_EXIT:
                return
            self.retire(oldest)     # the parent keeps its spares: a new one replaces it

    def reap(self):
        if self.workers and not skeleton.reap_children(self.ended):
            for slot in list(self.workers.values()):
                self.forget(slot)

    def ended(self, pid, status):
        slot = self.workers.get(pid)
        if slot is None:
            return
        self.forget(slot)
        if os.waitstatus_to_exitcode(status) == NOT_READY:
            # A worker that could not jail itself is not replaced at once:
            # a broken set-up must not become a fork loop.
            self.pause_until = time.monotonic() + RESPAWN_PAUSE

    def forget(self, slot):
        self.close_control(slot)
        self.counts[slot.state] -= 1
        del self.workers[slot.pid]

    def refuse_one(self):
        """All maxchildren workers are busy: the parent answers busy_reply."""
        conn = skeleton.accept(self.listener, self.log)
        if conn is not None:
            self.log.warning("busy", children=len(self.workers), reason="maxchildren reached")
            skeleton.refuse(conn, self.busy_reply)

    def spawn(self):
        """Fork one worker; False (and a pause) when that is not possible now."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as err:
            self.log.error("fork", reason=err.strerror)
            self.pause_until = time.monotonic() + RESPAWN_PAUSE
            return False
        try:
            pid = os.fork()
        except OSError as err:
            ours.close()
            theirs.close()
            self.log.error("fork", reason=err.strerror)
            self.pause_until = time.monotonic() + RESPAWN_PAUSE
            return False
        if pid == 0:
            skeleton.run_child(lambda: self.worker_main(theirs, ours))
        theirs.close()
        ours.setblocking(False)
        slot = _Slot(pid, ours, self.generation)
        self.workers[pid] = slot
        self.by_control[ours.fileno()] = slot
        self.counts[STARTING] += 1
        self.poller.register(ours, select.EPOLLIN)
        return True

    # -- in the worker -------------------------------------------------------
    def shed(self, control, parent_end):
        """Right after the fork: close every descriptor of the parent's.
        Those the pool knows are closed through their objects; anything
        else inherited (the caller's, unknown to the pool) by number,
        keeping fd 0-2, this worker's socketpair and the log's socket."""
        parent_end.close()
        self.listener.close()
        self.poller.close()
        self.signals.close_in_child()
        for slot in self.workers.values():
            if slot.control is not None:
                slot.control.close()
        keep = {0, 1, 2, control.fileno()}
        log_fileno = getattr(getattr(self.log, "sock", None), "fileno", None)
        if callable(log_fileno):        # common.log.Log's socket, when it has one
            keep.add(log_fileno())
        keep = sorted(keep)
        for low, high in zip(keep, keep[1:] + [_max_fd()]):
            os.closerange(low + 1, high)

    def worker_main(self, control, parent_end):
        skeleton.reset_child_signals()
        state = {"busy": False, "stop": False, "worker": None}

        def on_term(signum, frame):
            if not state["busy"]:
                if state["worker"] is not None:
                    state["worker"].close()
                os._exit(0)             # waiting for a connection: nothing to lose
            state["stop"] = True        # busy: finish this connection, take no other
        signal.signal(signal.SIGTERM, on_term)
        self.shed(control, parent_end)
        devnull = os.open(os.devnull, os.O_RDWR)    # kept: the jail has no /dev/null
        skeleton.release_client(devnull)
        silence_stderr()

        def tell(message):
            try:
                control.send(message)
                return True
            except OSError:
                return False            # the parent retired us, stopped or died

        try:
            worker = state["worker"] = self.prepare()
        except Exception as err:    # a bug, not a set-up the worker could report
            self.log.error("setup", reason="%s: %s" % (type(err).__name__, err))
            return NOT_READY
        leave_said = False
        try:
            served = 0
            limit = self.maxuse if worker.ready else 1
            if not tell(READY):
                return 0
            while True:
                set_title(self.idle_title)
                fd = _receive(control)
                if fd is None:
                    return 0            # end of file: retired, or the parent stopped or died
                state["busy"] = True
                served += 1
                skeleton.take_client(fd)
                try:
                    if worker.ready:
                        result = worker.handle()
                    else:
                        worker.refuse()
                        result = NOT_READY
                finally:
                    # The connection ends here, whatever happened in it.
                    skeleton.release_client(devnull)
                if result not in (0, None):
                    return result
                state["busy"] = False
                if served >= limit or state["stop"] or worker.exhausted:
                    break
                if not tell(READY):
                    return 0
            leave_said = True
            tell(DONE)
            return 0
        finally:
            if worker.ready and state["busy"] and not leave_said:
                tell(DONE)      # its connection failed: the parent may replace it now
            worker.close()


def _receive(control):
    """The next connection's descriptor from the parent, or None at end of file."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 16, 1)
        except OSError:
            return None
        if message == CONNECTION and len(fds) == 1:
            return fds[0]
        for fd in fds:
            os.close(fd)
        if not message:
            return None


def raise_descriptor_limit(wanted):
    """The parent holds one socket per worker: raise the soft limit of open
    files towards `wanted` (never beyond the hard limit)."""
    import resource     # --daemon only
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError):
                pass


def _max_fd():
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        return 1 << 16

