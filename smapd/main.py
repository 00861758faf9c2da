"""smapd's command line (DESIGN §3): parse, load the table, pick the mode.

The work is in smapd.control (start-up, lock, pid file, --flush, -q),
smapd.scan (the chrooted scanner) and smapd.agent (the delivery agent).
A start-up problem is one line `smapd: reason` (common.cli.program).
"""

import sys

from common import cli
from smapd import control

USAGE = """usage: smapd [-c TABLE] [-n] [-F | --once | -q | --flush] [--version]
  (no mode)          daemonise and deliver the spool (pid file DIRECTORY/.smapd.pid)
  -F, --foreground   stay in the foreground (the pid file is written too)
  --once             one pass over the spool, wait for the deliveries, exit
  -q, --queue        list the spool like mailq and exit
  --flush            wake the running smapd now (retries deferred mail) and exit
  -c, --config TABLE the netperm-table (default /etc/mailwall/netperm-table)
  -n, --check        check the table, print problems, exit 0 or 1
"""


@cli.program(control.PROGRAM, USAGE)
def main(argv=None):
    """cli.program turns a start-up error into one line `smapd: reason`."""
    argv = sys.argv[1:] if argv is None else argv
    options = cli.parse(argv, USAGE, short="q", long=["once", "queue", "flush"])
    if options.args:
        raise cli.UsageError("unexpected argument %s" % options.args[0])
    config = cli.load_or_die(options, control.PROGRAM, sys.stderr)
    if options.flags & {"-q", "--queue"}:
        return control.listing(config, sys.stdout)
    if "--flush" in options.flags:
        return control.flush(config, sys.stderr)
    return control.start(config, options, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
