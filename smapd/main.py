"""smapd's command line (DESIGN §3): parse, load the table, pick the mode.

The work is in smapd.control (start-up, lock, pid file, --flush, -q),
smapd.scan (the chrooted scanner) and smapd.agent (the delivery agent).
A start-up problem is one line `smapd: reason` (common.cli.program).
"""

import sys

from common import cli
from smapd import control, queuectl

USAGE = """usage: smapd [-c TABLE] [-n] [-F | --once | -q [--json] | --flush] [--version]
       smapd [-c TABLE] --hold | --release | --delete | --requeue ID...
  (no mode)          daemonise and deliver the spool (pid file DIRECTORY/.smapd.pid)
  -F, --foreground   stay in the foreground (the pid file is written too)
  --once             one pass over the spool, wait for the deliveries, exit
  -q, --queue        list the spool like mailq (--json: one object a line) and exit
  --flush            wake the running smapd now (retries deferred mail) and exit
  --hold ID...       put messages on hold: never delivered nor expired until released
  --release ID...    release held messages (tried at once)
  --delete ID...     remove messages from the queue or the hold, undelivered
  --requeue ID...    retry deferred messages now
  -c, --config TABLE the netperm-table (default /etc/mailwall/netperm-table)
  -n, --check        check the table, print problems, exit 0 or 1
"""


@cli.program(control.PROGRAM, USAGE)
def main(argv=None):
    """cli.program turns a start-up error into one line `smapd: reason`."""
    argv = sys.argv[1:] if argv is None else argv
    options = cli.parse(argv, USAGE, short="q",
                        long=["once", "queue", "flush"] + queuectl.LONG_OPTIONS)
    if options.args and not options.flags & queuectl.FLAGS:
        raise cli.UsageError("unexpected argument %s" % options.args[0])
    config = cli.load_or_die(options, control.PROGRAM, sys.stderr)
    if options.flags & (queuectl.FLAGS | {"-q", "--queue"}):
        return queuectl.run(config, options, sys.stdout, sys.stderr)
    if "--flush" in options.flags:
        return control.flush(config, sys.stderr)
    return control.start(config, options, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
