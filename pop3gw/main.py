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

USAGE = """usage: pop3-gw [-c TABLE] [-n] [--tls] [--daemon [ADDR:]PORT] [--tls-daemon [ADDR:]PORT]
               [-F] [--pidfile PATH] [--version]
  no mode argument: inetd mode, the client on fd 0/1 (--tls: implicit TLS, POP3S)
  --daemon [ADDR:]PORT  listen (default port 110); each session gets its own processes
  --tls-daemon [ADDR:]PORT  listen with implicit TLS (POP3S, default port 995),
                        alone or beside --daemon in the same process
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

    def __init__(self, listener, context, options, tls_listener=None, **kwargs):
        listeners = [x for x in (listener, tls_listener) if x is not None]
        super().__init__(listeners[0], context.logger,
                         context.config.get("maxchildren"), on_reload=self.reload_all,
                         more_listeners=listeners[1:], **kwargs)
        self.context, self.options = context, options
        self.tls_listener = tls_listener
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
        if self.context.server_tls is not None:
            # sessions in progress keep the context they forked with
            self.context.server_tls.reload(self.log)
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
            for listener in self.listeners:
                listener.close()
            ours.close()
            if connection is not None:
                connection.close()
            skeleton.release_client()
            skeleton.silence_stderr()
            skeleton.set_title("pop3-gw: standby")
            return gateway.standby(self.context, theirs)
        skeleton.run_child(child)

    def accept_one(self, listener=None):
        listener = listener or self.listener
        conn = skeleton.accept(listener, self.log)
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
                    # b"t": from the --tls-daemon port, the child starts with the handshake
                    message = b"t" if listener is self.tls_listener else b"c"
                    socket.send_fds(standby.control, [message], [conn.fileno()])
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


def take_value(argv, option):
    """(argv without `option VALUE` / `option=VALUE`, VALUE or None)."""
    rest, value, index = [], None, 0
    while index < len(argv):
        if argv[index] == option and index + 1 < len(argv):
            value, index = argv[index + 1], index + 2
            continue
        if argv[index].startswith(option + "="):
            value = argv[index].split("=", 1)[1]
        else:
            rest.append(argv[index])
        index += 1
    return rest, value


def server_tls_of(config, wanted):
    """The loaded common.tls.ServerTLS of tls-cert/tls-key, or None when they
    are not set; `wanted` (an option that needs them) makes that an error.
    A file that cannot be used is a cli.StartupError."""
    if not (config.get("tls-cert") and config.get("tls-key")):
        if wanted:
            raise cli.StartupError("%s needs tls-cert and tls-key in the table" % wanted)
        return None
    from common import tls
    server = tls.ServerTLS.from_config(config)
    try:
        server.load()
    except (tls.TLSFileError, OSError) as err:
        raise cli.StartupError(str(err)) from None
    return server


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
    argv, tls_daemon = take_value(argv, "--tls-daemon")
    options = cli.parse(argv, USAGE, long=["tls"], with_daemon=True)
    implicit = "--tls" in options.flags
    if options.daemon is not None and not options.check:
        host, port = cli.parse_listen(options.daemon, 110)
    if tls_daemon is not None and not options.check:
        tls_host, tls_port = cli.parse_listen(tls_daemon, 995, option="--tls-daemon")
    if implicit and (options.daemon is not None or tls_daemon is not None):
        raise cli.UsageError("--tls is for inetd mode; use --tls-daemon [ADDR:]PORT")
    config = cli.load_or_die(options, PROGRAM, None if inetd else sys.stderr)
    echo = sys.stderr if options.daemon and options.foreground and sys.stderr.isatty() else None
    logger = log.Log(PROGRAM, config.get("logfacility"), config.get("logsocket"), echo)
    database = authdb.Cache(config.get("authfile"))
    context = gateway.Context(config, database, logger)
    if options.daemon is None and tls_daemon is None:
        # inetd mode reads the certificate and key at each connection (as root)
        context.server_tls = server_tls_of(config, "--tls" if implicit else None)
        return gateway.connection(context, implicit)
    context.server_tls = server_tls_of(config, "--tls-daemon" if tls_daemon is not None
                                       else None)
    checked = check_database(database)
    if checked["reason"]:
        logger.error("authfile", reason=checked["reason"])
    skeleton.check_pidfile(pidfile)     # "already running" before "address in use"
    listener = tls_listener = None
    titles = []
    if options.daemon is not None:
        listener = skeleton.listen(host, port, name="--daemon %s" % options.daemon)
        titles.append("%s:%d" % (host, port))
    if tls_daemon is not None:
        tls_listener = skeleton.listen(tls_host, tls_port, name="--tls-daemon %s" % tls_daemon)
        titles.append("%s:%d (TLS)" % (tls_host, tls_port))
    listeners = [x for x in (listener, tls_listener) if x is not None]
    if options.foreground:
        skeleton.write_pidfile(pidfile)
    else:
        skeleton.daemonize(pidfile, keep_fds=[x.fileno() for x in listeners]
                           + ([logger.sock.fileno()] if logger.sock else []), logger=logger)
    if listener is not None:
        logger.info("listen", addr=host, port=port, users=checked["users"],
                    **({"tls": "stls"} if context.server_tls else {}))
    if tls_listener is not None:
        logger.info("listen", addr=tls_host, port=tls_port, users=checked["users"],
                    tls="implicit")
    Server(listener, context, options, tls_listener=tls_listener,
           busy_reply=b"-ERR [SYS/TEMP] too busy, try later\r\n",
           title="pop3-gw: listening on %s" % " ".join(titles)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
