"""Command-line options shared by the programs (DESIGN §3), and the one way
every program's main() meets a start-up problem (`program`).

A problem before a program serves (a bad option, a bad --daemon address,
a table that cannot be used, a busy port, a pid file held by a running
process...) is ONE line `PROGRAM: reason` on stderr and a non-zero exit
(2 for the command line, 1 otherwise), never a traceback.  Under inetd
fd 2 is the client's socket: there the program's own refusal (smap's 421,
pop3-gw's -ERR) and one log line take its place.

getopt rather than argparse: smap parses its command line once per
connection under inetd, and start-up cost matters there.  For the same
reason the command line inetd gives smap (nothing, or just `-c TABLE`) is
read without importing getopt (which imports gettext, locale and re).
"""

import _socket
import sys

from common import __version__, netperm

DEFAULT_TABLE = "/etc/mailwall/netperm-table"
COMMON_SHORT = "c:nhF"
COMMON_LONG = ["config=", "check", "help", "version", "foreground"]


class Options:
    def __init__(self):
        self.config = DEFAULT_TABLE
        self.check = False
        self.foreground = False
        self.daemon = None
        self.flags = set()
        self.args = []


class StartupError(Exception):
    """A problem that stops a program before it serves.  Its text is the
    whole reason, `FILE: reason` or `--option: reason`, on one line and
    without the program's name (`program` puts that in front); `status`
    is the exit status (2: the command line is wrong)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class UsageError(Exception):
    """The command line cannot be parsed: the reason, then the usage text."""


ONE_SHOT = frozenset(["-n", "--check", "-h", "--help", "--version"])


def inetd_mode(argv):
    """Whether argv means inetd mode (no --daemon, no one-shot option).  It is
    decided before the options are parsed, so that fd 2, the client's socket,
    is silenced before anything can fail and write to it."""
    return not any(a in ("--daemon", "--tls-daemon") or a.startswith(("--daemon=", "--tls-daemon="))
                   for a in argv) and not ONE_SHOT & set(argv)


def parse(argv, usage, short="", long=(), with_daemon=False):
    """Options from argv; prints usage/version and exits for -h/--version."""
    longs = COMMON_LONG + list(long) + (["daemon="] if with_daemon else [])
    pairs, rest = _config_only(argv), []
    if pairs is None:
        import getopt
        try:
            pairs, rest = getopt.getopt(argv, COMMON_SHORT + short, longs)
        except getopt.GetoptError as err:
            raise UsageError(str(err)) from None
    options = Options()
    for flag, value in pairs:
        if flag in ("-c", "--config"):
            options.config = value
        elif flag in ("-n", "--check"):
            options.check = True
        elif flag in ("-F", "--foreground"):
            options.foreground = True
        elif flag == "--daemon":
            options.daemon = value
        elif flag in ("-h", "--help"):
            sys.stdout.write(usage)
            raise SystemExit(0)
        elif flag == "--version":
            sys.stdout.write("mailwall %s\n" % __version__)
            raise SystemExit(0)
        else:
            options.flags.add(flag)
    options.args = rest
    return options


def _config_only(argv):
    """The (flag, value) pairs getopt would give when argv is empty or only
    names the table (`-c T`, `-cT`, `--config T`, `--config=T`); else None."""
    if not argv:
        return []
    if len(argv) == 2 and argv[0] in ("-c", "--config"):
        return [(argv[0], argv[1])]
    if len(argv) == 1 and argv[0].startswith("--config="):
        return [("--config", argv[0][len("--config="):])]
    if len(argv) == 1 and argv[0].startswith("-c") and len(argv[0]) > 2 \
            and not argv[0].startswith("--"):
        return [("-c", argv[0][2:])]
    return None


def parse_listen(text, default_port, option="--daemon"):
    """(address, port) from [ADDR:]PORT, [IPV6]:PORT or ADDR; the address
    defaults to all of IPv4.  ADDR must be an address, not a name (a
    listener binds to one address).  StartupError (status 2) names what
    is wrong, with the spelling to use when the intent is clear."""
    def bad(why):
        return StartupError("%s: bad address %r (%s)" % (option, text, why), status=2)

    if not text:
        raise bad("give [ADDR:]PORT")
    if text.isdigit():
        host, port = "0.0.0.0", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad("no ] after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise bad("only :PORT may follow ]")
        port = rest[1:] if rest else str(default_port)
        if not _is_address(host, _socket.AF_INET6):
            raise bad("not an IPv6 address in [ ]")
    elif text.count(":") > 1:
        host, _, port = text.rpartition(":")
        if port.isdigit() and _is_address(host, _socket.AF_INET6):
            raise bad("use [%s]:%s" % (host, port))
        if _is_address(text, _socket.AF_INET6):
            raise bad("use [%s]:%d" % (text, default_port))
        raise bad("an IPv6 address goes in brackets: [ADDR]:PORT")
    else:
        host, colon, port = text.partition(":")
        if not host:
            raise bad("no address before the colon; use 0.0.0.0:%s or just %s" % (port, port))
        if not _is_address(host, _socket.AF_INET):
            raise bad("ADDR must be a dotted quad or an [IPv6] address, or give just a PORT")
        port = port if colon else str(default_port)
    if not port.isdigit() or not port.isascii():
        raise bad("the port must be a number")
    if not 1 <= int(port) <= 65535:
        raise bad("the port must be 1 to 65535")
    return host, int(port)


def _is_address(text, family):
    try:
        _socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


TLS_ATTRIBUTES = ("tls-cert", "tls-key", "mailhub-tls", "mailhub-ca", "server-tls", "server-ca")


def check_table(config, stream):
    """The -n/--check report: problems as FILE:LINE: message; exit status.
    The TLS files the table names are opened as start-up would open them
    (common.tls, imported only when the table names one)."""
    for problem in config.problems:
        stream.write("%s\n" % problem)
    tls_problems = []
    if any(config.has(name) for name in TLS_ATTRIBUTES if name in config.declared):
        from common import tls
        tls_problems = tls.check_config(config)
    for problem in tls_problems:
        stream.write("%s\n" % problem)
    return 1 if config.errors or tls_problems else 0


def load_or_die(options, program, stream):
    """The table, or StartupError naming its first error (-n lists them
    all); with -n: the report on `stream` and exit."""
    config = netperm.load(options.config, program)
    if options.check:
        raise SystemExit(check_table(config, stream or sys.stdout))
    if config.errors:
        more = len(config.errors) - 1
        raise StartupError("%s%s" % (config.errors[0], "" if not more else
                           " (and %d more; `%s -n -c %s` lists them)" % (more, program, options.config)))
    return config


def describe(err):
    """One line for an exception: `FILE: reason` for an OSError."""
    if isinstance(err, OSError) and err.strerror:
        names = [name for name in (err.filename, err.filename2) if name is not None]
        return ": ".join([str(name) for name in names] + [err.strerror])
    return str(err) or type(err).__name__


def program(name, usage, refuse=None):
    """Decorate a program's main(argv=None) so that nothing it raises
    becomes a traceback: a UsageError is `NAME: reason` and the usage text
    (exit 2); a StartupError, an OSError or anything unforeseen one line
    `NAME: reason` (exit 1, or the error's status).  `refuse(reason)`, for
    a program with an inetd mode: under inetd fd 2 is silenced before
    main() runs (it is the client's socket), and a failure calls refuse,
    which logs it and answers the client in its protocol, instead.  After
    skeleton.daemonize, stderr is /dev/null: the line is logged too."""
    def decorate(main):
        def run(argv=None):
            inetd = refuse is not None and inetd_mode(sys.argv[1:] if argv is None else argv)
            if inetd:
                from common import skeleton
                skeleton.silence_stderr()
            try:
                return main(argv)
            except UsageError as err:
                if inetd:
                    refuse("usage: %s" % err)
                    return 2
                sys.stderr.write("%s: %s\n%s" % (name, err, usage))
                return 2
            except KeyboardInterrupt:
                return 130
            except Exception as err:    # noqa: BLE001  (this is the one place that must)
                status = getattr(err, "status", 1) if isinstance(err, StartupError) else 1
                reason = describe(err)
                if not isinstance(err, (StartupError, OSError)):
                    reason = "internal error: %s: %s%s" % (type(err).__name__, reason,
                                                          _where(err))
                if inetd:
                    refuse(reason)
                else:
                    _report(name, reason)
                return status
        run.__name__, run.__doc__, run.__wrapped__ = main.__name__, main.__doc__, main
        return run
    return decorate


def _where(err):
    """` (at FILE:LINE)` of the innermost frame: a bug report in one line."""
    trace = err.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    if trace is None:
        return ""
    return " (at %s:%d)" % (trace.tb_frame.f_code.co_filename, trace.tb_lineno)


def _report(name, reason):
    """The one line on stderr; also to syslog once detached (stderr is
    /dev/null then)."""
    try:
        sys.stderr.write("%s: %s\n" % (name, reason))
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    detached = sys.modules.get("common.skeleton")
    if detached is not None and detached.detached:
        logger = detached.detached_log
        if logger is None:
            from common import log
            logger = log.Log(name)
        logger.error("abort", reason=reason)
