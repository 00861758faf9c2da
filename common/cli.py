"""Command-line options shared by the programs (DESIGN §3).

getopt rather than argparse: smap parses its command line once per
connection under inetd, and start-up cost matters there.  For the same
reason the command line inetd gives smap (nothing, or just `-c TABLE`) is
read without importing getopt (which imports gettext, locale and re).
"""

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


class UsageError(Exception):
    pass


ONE_SHOT = frozenset(["-n", "--check", "-h", "--help", "--version"])


def inetd_mode(argv):
    """Whether argv means inetd mode (no --daemon, no one-shot option).  It is
    decided before the options are parsed, so that fd 2, the client's socket,
    is silenced before anything can fail and write to it."""
    return not any(a == "--daemon" or a.startswith("--daemon=") for a in argv) \
        and not ONE_SHOT & set(argv)


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


def parse_listen(text, default_port):
    """(address, port) from [ADDR:]PORT; the address defaults to all of IPv4."""
    if text.isdigit():
        host, port = "0.0.0.0", int(text)
    else:
        host, port = netperm.parse_hostport(text, default_port)
    if not 1 <= port <= 65535:
        raise UsageError("port out of range: %s" % text)
    return host, port


def check_table(config, stream):
    """The -n/--check report: problems as FILE:LINE: message; exit status."""
    for problem in config.problems:
        stream.write("%s\n" % problem)
    return 1 if config.errors else 0


def load_or_die(options, program, stream):
    """The table, or exit 1 with its problems on `stream` (None: silently)."""
    config = netperm.load(options.config, program)
    if options.check:
        raise SystemExit(check_table(config, stream or sys.stdout))
    if config.errors:
        if stream is not None:
            for problem in config.problems:
                stream.write("%s\n" % problem)
        raise SystemExit(1)
    return config
