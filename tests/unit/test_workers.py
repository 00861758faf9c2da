"""common.workers.WorkerPool without smap: a pool whose workers answer each
connection with their pid, run in a forked process on a loopback port.

Checked: a worker serves `maxuse` connections and is then replaced; no
more than `maxchildren` connections are served at once and the next one
gets the busy reply; a worker whose prepare fails is retried about once a
second, not in a fork loop; SIGTERM closes the port at once.
"""

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
