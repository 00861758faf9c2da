"""common.workers.WorkerPool without smap: a pool whose workers answer each
connection with their pid, run in a forked process on a loopback port.

Checked: a worker serves `maxuse` connections and is then replaced; no
more than `maxchildren` connections are served at once and the next one
gets the busy reply; a worker whose prepare fails is retried about once a
second, not in a fork loop; SIGTERM closes the port at once; a worker
holds its client's socket and its own socketpair with the parent, never
the listener, another client's socket, a pipe or a poller of the
parent's (issue 11, finding 5); a worker that says anything the protocol
does not expect is killed, and the pool goes on serving.
"""

import json
import os
import signal
import socket
import time

import pytest

from common import skeleton, workers


class NullLog:
    def __getattr__(self, name):
        return lambda *args, **fields: None


class PidWorker(workers.Worker):
    def handle(self):
        os.write(1, b"%d\n" % os.getpid())
        # wait for the client to close: holds the slot as long as it wants
        while os.read(0, 100):
            pass
        return 0


@pytest.fixture
def pool_factory(tmp_path):
    started = []

    def start(maxchildren=4, maxuse=3, prepare=PidWorker):
        listener = skeleton.listen("127.0.0.1", 0)
        port = listener.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            try:
                workers.WorkerPool(listener, prepare, NullLog(), maxchildren, maxuse,
                                   busy_reply=b"busy\n").run()
            finally:
                os._exit(0)
        listener.close()
        started.append(pid)
        return pid, port
    yield start
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def first_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        data += chunk
    return data


def test_a_worker_serves_maxuse_connections_then_is_replaced(pool_factory):
    _, port = pool_factory(maxuse=3)
    pids = []
    for _ in range(12):
        with connect(port) as sock:
            pids.append(int(first_line(sock)))
    counts = {pid: pids.count(pid) for pid in pids}
    assert max(counts.values()) <= 3            # never more than maxuse
    assert len(counts) < len(pids)              # and processes are reused
    time.sleep(0.5)
    for pid, count in counts.items():
        if count == 3:                          # a worker that has served maxuse is gone
            assert not os.path.exists("/proc/%d/cmdline" % pid) or \
                open("/proc/%d/cmdline" % pid, "rb").read() == b""


def test_maxchildren_connections_at_once_then_the_busy_reply(pool_factory):
    _, port = pool_factory(maxchildren=3, maxuse=100)
    held = [connect(port) for _ in range(3)]
    try:
        pids = {int(first_line(sock)) for sock in held}
        assert len(pids) == 3
        with connect(port) as extra:
            assert first_line(extra) == b"busy\n"
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:                 # the freed worker goes idle and takes the next
            with connect(port) as again:
                answer = first_line(again)
            if answer != b"busy\n" or time.monotonic() > deadline:
                break
        assert int(answer) in pids
    finally:
        for sock in held:
            sock.close()


def test_a_worker_that_cannot_prepare_is_not_respawned_in_a_loop(pool_factory, tmp_path):
    marks = tmp_path / "prepared"

    class Broken(workers.Worker):
        ready = False

        def refuse(self):
            os.write(1, b"refused\n")

    def prepare():
        with open(marks, "a") as out:
            out.write("x")
        return Broken()

    _, port = pool_factory(prepare=prepare)
    with connect(port) as sock:
        assert first_line(sock) == b"refused\n"
    time.sleep(1.5)
    assert len(marks.read_text()) <= 3      # about one attempt a second


def test_prepare_raising_is_paced_too(pool_factory, tmp_path):
    marks = tmp_path / "prepared"

    def prepare():
        with open(marks, "a") as out:
            out.write("x")
        raise RuntimeError("a bug")

    pool_factory(prepare=prepare)
    time.sleep(1.5)
    assert 1 <= len(marks.read_text()) <= 3


def test_sigterm_closes_the_port(pool_factory):
    pid, port = pool_factory()
    with connect(port) as sock:
        assert int(first_line(sock)) > 0
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the port stayed open"
        time.sleep(0.05)


def open_descriptors():
    """{fd: target} of this process (the directory's own descriptor left out)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + name)
        except OSError:
            continue
        if not target.startswith("/proc/"):
            found[int(name)] = target
    return found


class FdWorker(workers.Worker):
    def handle(self):
        os.write(1, json.dumps(open_descriptors()).encode() + b"\n")
        while os.read(0, 100):
            pass
        return 0


def test_a_worker_holds_its_client_and_its_socketpair_only(pool_factory):
    _, port = pool_factory(maxchildren=3, maxuse=2, prepare=FdWorker)
    # a connection served and closed first: what a worker holds after one
    with connect(port) as warm:
        json.loads(first_line(warm))
    held, socks = [], [connect(port), connect(port)]
    try:
        for sock in socks:          # two at once: each worker holds its own only
            held.append({int(fd): target for fd, target in json.loads(first_line(sock)).items()})
    finally:
        for sock in socks:
            sock.close()
    for fds in held:
        assert fds[0] == fds[1] and fds[0].startswith("socket:["), fds
        assert fds[2] == os.devnull
        others = [target for fd, target in fds.items() if fd > 2 and target != os.devnull]
        # one socket besides the client's: this worker's socketpair with the parent
        assert len(others) == 1 and others[0].startswith("socket:[") and others[0] != fds[0], fds
    assert held[0][0] != held[1][0]


def test_the_listener_is_the_parents_alone(pool_factory):
    pid, port = pool_factory(maxchildren=3, prepare=FdWorker)
    with connect(port) as sock:
        fds = {int(fd): target for fd, target in json.loads(first_line(sock)).items()}
        worker_sockets = {t for t in fds.values() if t.startswith("socket:[")}
        parent_sockets = {t for t in descriptors_of(pid).values() if t.startswith("socket:[")}
        listening = listening_inodes()
        assert {s for s in parent_sockets if inode_of(s) in listening}, parent_sockets
        assert not {s for s in worker_sockets if inode_of(s) in listening}, fds


def descriptors_of(pid):
    found = {}
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            found[int(name)] = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except OSError:
            continue
    return found


def inode_of(target):
    return int(target[len("socket:["):-1])


def listening_inodes():
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            found |= {int(row.split()[9]) for row in rows if row.split()[3] == "0A"}
    return found


def alive(pid):
    """pid runs (a zombie or a process gone has an empty cmdline)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as cmdline:
            return bool(cmdline.read())
    except OSError:
        return False


class ChattyWorker(workers.Worker):
    """Taken over: it says on its socketpair what the protocol does not allow."""

    def __init__(self, message):
        self.message = message

    def handle(self):
        os.write(1, b"%d\n" % os.getpid())
        for fd, target in open_descriptors().items():
            if fd > 2 and target.startswith("socket:["):
                try:
                    os.write(fd, self.message)
                except OSError:
                    pass
        while os.read(0, 100):
            pass
        return 0


@pytest.mark.parametrize("message", [b"x", b"rr", b"", b"c"])
def test_a_worker_that_breaks_the_protocol_is_killed_and_the_pool_goes_on(pool_factory, message):
    _, port = pool_factory(maxchildren=3, maxuse=100, prepare=lambda: ChattyWorker(message))
    sock = connect(port)
    try:
        chatty = int(first_line(sock))
        assert sock.recv(100) == b""        # killed: its connection ends
    finally:
        sock.close()
    deadline = time.monotonic() + 10
    while alive(chatty):
        assert time.monotonic() < deadline, "the worker was not killed"
        time.sleep(0.05)
    with connect(port) as again:
        assert int(first_line(again)) not in (0, chatty)
