"""pop3-gw's command line (DESIGN §3, §8).

inetd mode (no mode argument): the client is on fd 0/1 and fd 2 is silenced
at once.  `--daemon [ADDR:]PORT` (default port 110): listen, detach with
python-daemon unless `-F`, write the pid file (`--pidfile`, default
/run/pop3-gw.pid), and fork one child per connection that runs exactly the
inetd path (pop3gw.gateway).  SIGHUP re-reads the table and checks the
auth db; every session's root monitor reads the db file itself, so a change
by authmgr needs no signal; SIGTERM stops accepting.  Every module the jailed children need
is imported here, before any chroot.
"""

import encodings.idna  # noqa: F401  (socket imports it lazily; not in the chroot)
import sys

from common import authdb, cli, log, netperm, skeleton
from pop3gw import gateway

USAGE = """usage: pop3-gw [-c TABLE] [-n] [--daemon [ADDR:]PORT [-F] [--pidfile PATH]] [--version]
  no mode argument: inetd mode, the client on fd 0/1
  --daemon [ADDR:]PORT  listen (default port 110) and fork one child per connection
  -F                    with --daemon: stay in the foreground
  --pidfile PATH        with --daemon: the pid file (default /run/pop3-gw.pid)
  -c, --config TABLE    the netperm-table (default /etc/mailwall/netperm-table)
  -n, --check           check the table, print problems, exit 0 or 1
"""

PROGRAM = "pop3-gw"
DEFAULT_PIDFILE = "/run/pop3-gw.pid"


class Server(skeleton.Daemon):
    """The accept loop; SIGHUP re-reads the table and checks the auth db."""

    def __init__(self, listener, context, options, **kwargs):
        super().__init__(listener, lambda: gateway.connection(context), context.logger,
                         context.config.get("maxchildren"), on_reload=self.reload_all, **kwargs)
        self.context, self.options = context, options

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


def main(argv=None):
    argv, pidfile = take_pidfile(sys.argv[1:] if argv is None else argv)
    inetd = cli.inetd_mode(argv)
    if inetd:
        skeleton.silence_stderr()   # fd 2 is the client's socket under inetd
    try:
        options = cli.parse(argv, USAGE, with_daemon=True)
    except cli.UsageError as err:
        if not inetd:
            sys.stderr.write("pop3-gw: %s\n%s" % (err, USAGE))
        return 2
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
    host, port = cli.parse_listen(options.daemon, 110)
    listener = skeleton.listen(host, port)
    if options.foreground:
        skeleton.write_pidfile(pidfile)
    else:
        skeleton.daemonize(pidfile, keep_fds=[listener.fileno()]
                           + ([logger.sock.fileno()] if logger.sock else []))
    logger.info("listen", addr=host, port=port, users=checked["users"])
    Server(listener, context, options, busy_reply=b"-ERR [SYS/TEMP] too busy, try later\r\n",
           title="pop3-gw: listening on %s:%d" % (host, port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
