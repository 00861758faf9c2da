"""pop3-gw's command line (DESIGN §3, §8).

inetd mode (no mode argument): the client is on fd 0/1 and fd 2 is silenced
at once.  `--daemon [ADDR:]PORT` (default port 110): listen, detach with
python-daemon unless `-F`, write the pid file (`--pidfile`, default
/run/pop3-gw.pid), and pass each connection to a session pair forked for
it ahead of time (a "standby", see Server), which runs the inetd path from
the host rules on (pop3gw.gateway) and serves no other connection.  SIGHUP
re-reads the table, checks the auth db and replaces the standby; every
session's root monitor reads the db file itself, so a change by authmgr
needs no signal; SIGTERM stops accepting.  Every module the jailed children
need is imported here, before any chroot.
"""

import encodings.idna  # noqa: F401  (socket imports it lazily; not in the chroot)
import os
import socket
import sys
import time

from common import authdb, cli, log, netperm, skeleton
from pop3gw import gateway

USAGE = """usage: pop3-gw [-c TABLE] [-n] [--daemon [ADDR:]PORT [-F] [--pidfile PATH]] [--version]
  no mode argument: inetd mode, the client on fd 0/1
  --daemon [ADDR:]PORT  listen (default port 110); each session gets its own processes
  -F                    with --daemon: stay in the foreground
  --pidfile PATH        with --daemon: the pid file (default /run/pop3-gw.pid)
  -c, --config TABLE    the netperm-table (default /etc/mailwall/netperm-table)
  -n, --check           check the table, print problems, exit 0 or 1
"""

PROGRAM = "pop3-gw"
DEFAULT_PIDFILE = "/run/pop3-gw.pid"


class Standby:
    """The daemon's view of a standby session pair: its pid and the socket
    on which it gets its one connection."""

    def __init__(self, pid, control):
        self.pid, self.control = pid, control
        self.since = time.monotonic()


class Server(skeleton.Daemon):
    """The accept loop; SIGHUP re-reads the table and checks the auth db.

    Each connection goes to a standby: a session pair (gateway.standby)
    forked before the connection arrived, so the two forks, the jail and the
    db read are off the client's wait.  A standby serves one connection
    only; the next is forked just after the hand-over, while the client
    talks to the one before.  It counts against `maxchildren` like a
    session, is made again after SIGHUP so it never serves with an old
    table, and is ended after STANDBY_IDLE seconds without a connection
    (a quiet gateway keeps only its sessions' processes)."""

    STANDBY_IDLE = 2.0

    def __init__(self, listener, context, options, **kwargs):
        super().__init__(listener, context.logger,
                         context.config.get("maxchildren"), on_reload=self.reload_all, **kwargs)
        self.context, self.options = context, options
        self.standby = None

    def reload_all(self):
        config = netperm.load(self.options.config, PROGRAM)
        if config.errors:
            self.log.error("reload", reason="table has errors; keeping the old one",
                           problem=str(config.errors[0]))
        else:
            self.context.config = config
            self.maxchildren = config.get("maxchildren")
            self.context.database = authdb.Cache(config.get("authfile"))
        self.log.info("reload", **check_database(self.context.database))
        if self.standby is not None:
            self.retire_standby()
            self.make_standby()

    def run(self):
        try:
            super().run()
        finally:
            self.retire_standby()

    def reap(self):
        super().reap()
        standby = self.standby
        if standby is not None and (standby.pid not in self.children
                                    or time.monotonic() - standby.since > self.STANDBY_IDLE):
            self.retire_standby()

    def retire_standby(self):
        """End of file on its control socket: it cancels its pair and exits."""
        if self.standby is not None:
            self.standby.control.close()
            self.standby = None

    def make_standby(self, connection=None):
        """Fork the next standby (`connection`: the socket the daemon holds
        now, which the standby must not keep: it gets it passed like any other)."""
        if self.signals is None or self.stopping or len(self.children) >= self.maxchildren:
            return
        ours, theirs = socket.socketpair()
        try:
            pid = os.fork()
        except OSError as err:
            self.log.error("fork", reason=err.strerror)
            ours.close()
            theirs.close()
            return
        if pid:
            theirs.close()
            self.children.add(pid)
            self.standby = Standby(pid, ours)
            return

        def child():
            skeleton.reset_child_signals()
            self.signals.close_in_child()
            self.listener.close()
            ours.close()
            if connection is not None:
                connection.close()
            skeleton.release_client()
            skeleton.silence_stderr()
            skeleton.set_title("pop3-gw: standby")
            return gateway.standby(self.context, theirs)
        skeleton.run_child(child)

    def accept_one(self):
        conn = skeleton.accept(self.listener, self.log)
        if conn is None:
            return
        handed = False
        try:
            for _ in range(2):      # a standby that died unused is replaced once
                if self.standby is None:
                    if len(self.children) >= self.maxchildren:
                        self.reap()     # a child that just ended still counts until reaped
                    self.make_standby(conn)
                if self.standby is None:
                    break
                standby, self.standby = self.standby, None
                try:
                    socket.send_fds(standby.control, [b"c"], [conn.fileno()])
                    handed = True
                    break
                except OSError:
                    continue
                finally:
                    standby.control.close()
            if not handed:
                self.log.warning("busy", children=len(self.children),
                                 reason="maxchildren reached" if len(self.children)
                                 >= self.maxchildren else "no session process")
                skeleton.refuse(conn, self.busy_reply)
        finally:
            conn.close()
        if handed:
            # only now: the next standby must not inherit this client's socket
            self.make_standby()


def check_database(database):
    """Read the db once to report on it, then forget the secrets again (each
    session's root monitor reads the file itself, after forking its child)."""
    error = database.reload()
    fields = dict(users=len(database.users), reason=error)
    database.forget()
    return fields


def take_pidfile(argv):
    """--pidfile PATH out of argv (the shared option parser keeps no values)."""
    rest, pidfile, index = [], DEFAULT_PIDFILE, 0
    while index < len(argv):
        if argv[index] == "--pidfile" and index + 1 < len(argv):
            pidfile, index = argv[index + 1], index + 2
            continue
        if argv[index].startswith("--pidfile="):
            pidfile = argv[index].split("=", 1)[1]
        else:
            rest.append(argv[index])
        index += 1
    return rest, pidfile


def refuse_inetd(reason):
    """Start-up failed in inetd mode: one log line (default socket), a
    temporary -ERR to the client, nothing on fd 2."""
    log.Log(PROGRAM).error("abort", reason=reason)
    try:
        os.write(1, b"-ERR [SYS/TEMP] service not available, try again later\r\n")
    except OSError:
        pass
    return 1


@cli.program(PROGRAM, USAGE, refuse=refuse_inetd)
def main(argv=None):
    """cli.program has silenced fd 2 under inetd, and turns a start-up
    error into one line (or, under inetd, refuse_inetd's -ERR)."""
    argv, pidfile = take_pidfile(sys.argv[1:] if argv is None else argv)
    inetd = cli.inetd_mode(argv)
    options = cli.parse(argv, USAGE, with_daemon=True)
    if options.daemon is not None and not options.check:
        host, port = cli.parse_listen(options.daemon, 110)
    config = cli.load_or_die(options, PROGRAM, None if inetd else sys.stderr)
    echo = sys.stderr if options.daemon and options.foreground and sys.stderr.isatty() else None
    logger = log.Log(PROGRAM, config.get("logfacility"), config.get("logsocket"), echo)
    database = authdb.Cache(config.get("authfile"))
    context = gateway.Context(config, database, logger)
    if options.daemon is None:
        return gateway.connection(context)
    checked = check_database(database)
    if checked["reason"]:
        logger.error("authfile", reason=checked["reason"])
    skeleton.check_pidfile(pidfile)     # "already running" before "address in use"
    listener = skeleton.listen(host, port, name="--daemon %s" % options.daemon)
    if options.foreground:
        skeleton.write_pidfile(pidfile)
    else:
        skeleton.daemonize(pidfile, keep_fds=[listener.fileno()]
                           + ([logger.sock.fileno()] if logger.sock else []), logger=logger)
    logger.info("listen", addr=host, port=port, users=checked["users"])
    Server(listener, context, options, busy_reply=b"-ERR [SYS/TEMP] too busy, try later\r\n",
           title="pop3-gw: listening on %s:%d" % (host, port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
