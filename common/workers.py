"""smap --daemon's accept loop: pre-forked session processes that each
serve up to `maxuse` connections, after Postfix's master(8).

Imported only by the --daemon code (smap under inetd starts a fresh
interpreter per connection and must not pay for it).  The parent never
reads a client byte: it forks workers, reads their 5-byte status records
from a pipe only it and they hold, reaps them, and answers `busy_reply`
itself when all `maxchildren` are busy.  Each worker is jailed by the
caller's `prepare()` before it accepts its first connection.
"""

import os
import select
import signal
import struct
import time

from common import skeleton
from common.skeleton import signal_pipe, silence_stderr, set_title


WORKER_IDLE, WORKER_BUSY, WORKER_LEAVING = 0, 1, 2
_STATUS = "=iB"                 # (pid, state): 5 bytes, one atomic pipe write
WORKER_IDLE_EXIT = 100.0        # an idle worker leaves after this many seconds (Postfix max_idle)
RESPAWN_PAUSE = 1.0             # after a worker that was not ready, wait this long
NOT_READY = 3                   # the exit status of such a worker
REFUSE_GRACE = 0.05             # seconds to wait for a slot before answering 421


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


class WorkerPool:
    """The accept loop of smap --daemon, after Postfix's master(8): worker
    processes accept on the shared listener themselves and each serves up
    to `maxuse` connections, one at a time, before it exits; the parent only
    keeps `spare` idle workers ready (never more than `maxchildren` in all),
    answers `busy_reply` itself when all `maxchildren` are busy, reaps, and
    stops on SIGTERM (idle workers leave at once, busy ones after their
    connection).  Forking per connection costs smap more CPU than the whole
    SMTP session; a worker pays for its fork once per `maxuse` connections.

    `prepare()` is called once in each new worker, still as root: it jails
    the process and returns a Worker.  What the pool trusts: its workers'
    5-byte status records on a pipe only it and they hold.
    """

    def __init__(self, listener, prepare, log, maxchildren, maxuse, busy_reply=b"",
                 title="daemon", idle_title="idle", spare=1):
        self.listener = listener
        self.prepare = prepare
        self.log = log
        self.maxchildren = maxchildren
        self.maxuse = maxuse
        self.busy_reply = busy_reply
        self.title = title
        self.idle_title = idle_title
        self.spare = max(1, min(spare, maxchildren))
        self.workers = {}           # pid -> WORKER_IDLE | WORKER_BUSY
        self.stopping = False
        self.pause_until = 0.0

    def _on_term(self, signum, frame):
        self.stopping = True

    def idle(self):
        return sum(1 for state in self.workers.values() if state == WORKER_IDLE)

    def active(self):
        """Workers that hold or may take a connection (not those on their way out)."""
        return sum(1 for state in self.workers.values() if state != WORKER_LEAVING)

    def full(self):
        return self.active() >= self.maxchildren and self.idle() == 0

    def run(self):
        wake_r, wake_w = signal_pipe()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.signal(signal.SIGHUP, lambda signum, frame: None)    # nothing to reload
        self.listener.setblocking(False)
        self.status_r, self.status_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.status_r, False)
        # Workers watch this pipe: end of file (the parent stopped or died) means leave.
        self.watch_r, self.watch_w = os.pipe2(os.O_CLOEXEC)
        self.wake = (wake_r, wake_w)
        set_title(self.title)
        try:
            while not self.stopping:
                self.reap()
                self.read_status()
                now = time.monotonic()
                while (self.active() < self.maxchildren and self.idle() < self.spare
                       and now >= self.pause_until and not self.stopping):
                    self.spawn()
                watched = [self.status_r, wake_r] + ([self.listener] if self.full() else [])
                timeout = 5.0 if now >= self.pause_until else self.pause_until - now
                try:
                    ready, _, _ = select.select(watched, [], [], timeout)
                except InterruptedError:
                    continue
                if wake_r in ready:
                    _drain(wake_r)
                if self.listener in ready and not self.stopping:
                    # A client that connects as soon as it has read the last
                    # reply of the session before it often finds that session's
                    # worker not yet idle or gone: give the workers a moment
                    # to say so before answering 421.
                    select.select([self.status_r], [], [], REFUSE_GRACE)
                    self.reap()
                    self.read_status()
                    if self.full():
                        self.refuse_one()
        finally:
            signal.set_wakeup_fd(-1)
            self.listener.close()
            for pid in self.workers:
                try:
                    os.kill(pid, signal.SIGTERM)    # idle: leave; busy: close the port, finish
                except OSError:
                    pass
            os.close(self.watch_w)  # and should a signal be missed, end of file says the same
            for fd in (self.watch_r, self.status_r, self.status_w, wake_r, wake_w):
                os.close(fd)
        self.log.info("stop", children=len(self.workers))

    def read_status(self):
        size = struct.calcsize(_STATUS)
        while True:
            try:
                data = os.read(self.status_r, size * 512)
            except BlockingIOError:
                return
            if not data:
                return
            for offset in range(0, len(data) - size + 1, size):
                pid, state = struct.unpack_from(_STATUS, data, offset)
                if pid in self.workers:
                    self.workers[pid] = state

    def reap(self):
        if self.workers and not skeleton.reap_children(self.ended):
            self.workers.clear()

    def ended(self, pid, status):
        if self.workers.pop(pid, None) is not None \
                and os.waitstatus_to_exitcode(status) == NOT_READY:
            # A worker that could not jail itself is not replaced at once:
            # a broken set-up must not become a fork loop.
            self.pause_until = time.monotonic() + RESPAWN_PAUSE

    def refuse_one(self):
        """All maxchildren workers are busy: the parent answers busy_reply."""
        conn = skeleton.accept(self.listener, self.log)
        if conn is not None:
            self.log.warning("busy", children=len(self.workers), reason="maxchildren reached")
            skeleton.refuse(conn, self.busy_reply)

    def spawn(self):
        pid = os.fork()
        if pid:
            self.workers[pid] = WORKER_IDLE     # counts as a spare while it starts
            return
        skeleton.run_child(self.worker_main)

    def worker_main(self):
        skeleton.reset_child_signals()
        state = {"busy": False, "stop": False, "worker": None}

        def on_term(signum, frame):
            if not state["busy"]:
                if state["worker"] is not None:
                    state["worker"].close()
                os._exit(0)             # waiting in accept: nothing to lose
            state["stop"] = True
            # the port must close now, not when this connection ends: the
            # kernel would queue new connections that nobody will accept
            self.listener.close()
        signal.signal(signal.SIGTERM, on_term)
        for fd in self.wake + (self.status_r, self.watch_w):
            os.close(fd)
        os.set_inheritable(self.status_w, False)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        silence_stderr()
        me = os.getpid()

        def report(worker_state):
            os.write(self.status_w, struct.pack(_STATUS, me, worker_state))

        try:
            worker = state["worker"] = self.prepare()
        except Exception as err:    # a bug, not a set-up the worker could report
            self.log.error("setup", reason="%s: %s" % (type(err).__name__, err))
            return NOT_READY
        try:
            waiter = select.epoll()
            # EPOLLEXCLUSIVE: one new connection wakes one idle worker, not all of them.
            waiter.register(self.listener.fileno(),
                            select.EPOLLIN | select.EPOLLEXCLUSIVE)
            waiter.register(self.watch_r, select.EPOLLIN)
            served = 0
            limit = self.maxuse if worker.ready else 1
            while served < limit and not state["stop"] and not worker.exhausted:
                set_title(self.idle_title)
                events = waiter.poll(WORKER_IDLE_EXIT)
                if not events:
                    break                       # idle too long: the parent keeps its spares
                if any(fd == self.watch_r for fd, _ in events):
                    break                       # the parent stopped or died
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue                    # another worker took it
                state["busy"] = True
                report(WORKER_BUSY)
                served += 1
                os.dup2(conn.fileno(), 0)
                os.dup2(conn.fileno(), 1)
                conn.close()
                try:
                    if worker.ready:
                        result = worker.handle()
                    else:
                        worker.refuse()
                        result = NOT_READY
                finally:
                    # The connection ends here, whatever happened in it.
                    os.dup2(devnull, 0)
                    os.dup2(devnull, 1)
                if result not in (0, None):
                    return result
                state["busy"] = False
                if served < limit and not state["stop"] and not worker.exhausted:
                    report(WORKER_IDLE)
            return 0
        finally:
            if worker.ready:
                # the parent may start a replacement now, before this one is
                # reaped (one that was not ready is paced by its exit status)
                report(WORKER_LEAVING)
            worker.close()


def _drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
