"""Issue 11, finding 5: a daemon's session processes hold the listening
socket, so one taken over in one connection could accept() the next
clients' connections.

DESIGN §3: "A session process holds its client's socket, never the
listener."  Checked on the real programs started as root, from
/proc/PID/fd, /proc/net/{tcp,tcp6,unix} and ss(8) (tests/security/
descriptors.py):

* the listening socket is held by the daemon parent and by no other
  process (so no session process can accept a connection);
* `smap --daemon`, with `maxuse 1` and `maxuse 100` (there after one
  connection already served), two clients connected at once: each busy
  session process holds exactly its own client's socket (fd 0 and 1),
  /dev/null (fd 2), its syslog socket, its resolver helper's socketpair
  and its control socketpair with the parent, and nothing else (not the
  other client's socket, not another worker's control socket, no pipe, no
  epoll); an idle one the same with /dev/null for the client; the
  resolver helper only /dev/null and its socketpair;
* `pop3-gw --daemon`, two clients connected: each session's root monitor
  and jailed child hold exactly their own client's socket, /dev/null,
  the syslog socket and their link to each other; the standby pair
  forked for the next connection holds no client socket at all, only its
  control socket with the daemon besides.
"""

import pwd

import pytest

from tests.integration import pop3_helpers, realpeers
from tests.integration.pop3_helpers import close_clients, shared_dir  # noqa: F401
from tests.integration.smap_helpers import IDLE_TITLE, title_of
from tests.integration.smapd_helpers import children_of, parent_of
from tests.security import descriptors
from tests.security.descriptors import holders, labelled, listening_sockets, sockets_of
from tests.security.harness import SmapSetup

pytestmark = pytest.mark.integration

NULL = "/dev/null"
SERVING = b"smap: 127.0.0.1"


def listener_of(port):
    """The inode of the socket listening on 127.0.0.1:port."""
    for row in descriptors._tcp_rows():
        if row[3] == descriptors.TCP_LISTEN and descriptors._port(row[1]) == port:
            return int(row[9])
    raise AssertionError("nothing listens on port %d" % port)


def server_side(port, client_sock):
    inode = descriptors.server_side_of(port, client_sock.getsockname()[1])
    assert inode, "no server side for the client on port %d" % port
    return inode


def held(pid, names, peers, client=False):
    """pid's descriptors by name (descriptors.labelled), /dev/null left out
    (fd 2, Python's sys.stderr on it, and fd 0/1 between connections) once
    fd 2 is seen to be it; with client, fd 0 and 1 are the client's socket."""
    fds = descriptors.descriptors(pid)
    assert fds.get(2) == NULL, (pid, title_of(pid), fds)
    if client:
        assert fds.get(0) == fds.get(1) and names.get(fds.get(0)) == "client", (pid, fds)
    return [name for name in labelled(pid, names, peers) if name != NULL]


def assert_cannot_accept(pid, what):
    held = sockets_of(pid) & listening_sockets()
    assert not held, "%s (pid %d, %s) holds listening socket(s) %s" % (
        what, pid, title_of(pid), sorted(held))


def settled_workers(daemon_pid, busy):
    """The daemon's workers once each has finished its set-up (titled as
    waiting or serving, its resolver helper started), `busy` of them serve
    and a spare waits; None meanwhile (a worker on its way out still has
    its last client's title)."""
    workers = children_of(daemon_pid)
    titles = [title_of(pid) for pid in workers]
    if titles.count(SERVING) != busy or IDLE_TITLE not in titles \
            or set(titles) - {SERVING, IDLE_TITLE}:
        return None
    if any(len(children_of(pid)) != 1 for pid in workers):
        return None
    return workers


@pytest.mark.parametrize("maxuse", [1, 100])
def test_a_smap_daemon_session_process_holds_only_its_client(tmp_path, maxuse):
    realpeers.require_root()
    setup = SmapSetup(tmp_path, lines=["smap: maxuse %d" % maxuse])
    try:
        daemon, port = setup.daemon()
        # one whole connection first: then a worker that has served one
        # serves again (maxuse 100), or has left (maxuse 1)
        warm = setup.connect(port)
        assert warm.reply()[0] == 220
        assert warm.cmd("QUIT")[0] == 221
        assert warm.closed_by_server(10)
        realpeers.wait_until(lambda: settled_workers(daemon.pid, 0), 10, what="an idle worker")
        clients = []
        for _ in range(2):
            client = setup.connect(port)
            assert client.reply()[0] == 220
            clients.append(client)
        workers = realpeers.wait_until(lambda: settled_workers(daemon.pid, 2), 10,
                                       what="two busy workers and a spare")
        assert holders(listener_of(port)) == [daemon.pid]
        log_inode = descriptors.unix_path_inode(setup.logs.path)
        assert log_inode

        served = {}
        for client in clients:
            inode = server_side(port, client.sock)
            # the daemon passed the connection on and closed its copy
            holding = holders(inode)
            assert len(holding) == 1 and holding[0] in workers, (holding, title_of(holding[0]))
            served[holding[0]] = inode
        assert len(served) == 2, served

        peers = descriptors.unix_peers()
        for worker in workers:
            resolvers = children_of(worker)
            assert len(resolvers) == 1, (worker, [title_of(p) for p in resolvers])
            resolver = resolvers[0]
            names = {"peer:%d" % log_inode: "log",
                     "peer-of:%d" % daemon.pid: "control", "peer-of:%d" % resolver: "resolver"}
            if worker in served:
                names["socket:[%d]" % served[worker]] = "client"
                client_fds = ["client", "client"]
            else:
                assert title_of(worker) == IDLE_TITLE
                client_fds = []
            assert_cannot_accept(worker, "smap session process")
            assert held(worker, names, peers, client=bool(client_fds)) == sorted(
                client_fds + ["log", "resolver", "control"]), title_of(worker)
            assert_cannot_accept(resolver, "smap resolver helper")
            assert held(resolver, {"peer-of:%d" % worker: "session"}, peers) == ["session"]
        for client in clients:
            assert client.cmd("QUIT")[0] == 221
    finally:
        setup.stop()


def uid_of(pid):
    return int(pop3_helpers.status_of(pid)["Uid"].split()[0])


def standby_of(daemon_pid, root):
    """(monitor, child) of the standby pair once the child runs as its user; else None."""
    pair = pop3_helpers.standby_pair(daemon_pid)
    if not pair:
        return None
    monitor = [pid for pid in pair if uid_of(pid) == root]
    child = [pid for pid in pair if uid_of(pid) != root]
    return (monitor[0], child[0]) if len(monitor) == len(child) == 1 else None


def test_a_pop3_gw_daemon_session_holds_only_its_client(shared_dir):
    realpeers.require_root()
    setup = pop3_helpers.Setup(shared_dir / "gw", "127.0.0.1:9")
    try:
        with pop3_helpers.Daemon(setup) as daemon:
            daemon_pid = daemon.proc.pid
            clients = [pop3_helpers.Client(daemon.port, timeout=20) for _ in range(2)]
            for client in clients:
                assert client.line().startswith(b"+OK")
            root = pwd.getpwnam("root").pw_uid
            # the pair forked for the next connection, once its child has
            # jailed itself (it closed what it must not keep before that)
            standby = realpeers.wait_until(lambda: standby_of(daemon_pid, root), 10,
                                           what="the standby pair")
            assert holders(listener_of(daemon.port)) == [daemon_pid]
            log_inode = descriptors.unix_path_inode(setup.log.path)
            assert log_inode

            sessions = []
            for client in clients:
                inode = server_side(daemon.port, client.sock)
                # the monitor passes the client's socket to its child and
                # keeps no copy: the child is its only holder
                holding = realpeers.wait_until(lambda: len(holders(inode)) == 1 and holders(inode),
                                               10, what="the session child of a client")
                child = holding[0]
                monitor = parent_of(child)
                assert uid_of(child) != root and uid_of(monitor) == root
                assert title_of(monitor).startswith(b"pop3-gw: monitor"), title_of(monitor)
                assert parent_of(monitor) == daemon_pid
                sessions.append((inode, monitor, child))

            peers = descriptors.unix_peers()
            for inode, monitor, child in sessions:
                names = {"socket:[%d]" % inode: "client", "peer:%d" % log_inode: "log",
                         "peer-of:%d" % monitor: "monitor", "peer-of:%d" % child: "child"}
                assert_cannot_accept(monitor, "pop3-gw session monitor")
                assert_cannot_accept(child, "pop3-gw session child")
                assert held(monitor, names, peers) == ["child", "log"], title_of(monitor)
                assert held(child, names, peers, client=True) == \
                    ["client", "client", "log", "monitor"], title_of(child)
            standby_monitor, standby_child = standby
            names = {"peer:%d" % log_inode: "log", "peer-of:%d" % daemon_pid: "daemon",
                     "peer-of:%d" % standby_monitor: "monitor",
                     "peer-of:%d" % standby_child: "child"}
            assert_cannot_accept(standby_monitor, "pop3-gw standby monitor")
            assert_cannot_accept(standby_child, "pop3-gw standby child")
            assert held(standby_monitor, names, peers) == ["child", "daemon", "log"]
            assert held(standby_child, names, peers) == ["log", "monitor"]
            for client in clients:
                assert client.command(b"QUIT").startswith(b"+OK")
    finally:
        setup.log.close()
