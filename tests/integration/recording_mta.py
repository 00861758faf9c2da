#!/usr/bin/env python3
"""A recording stand-in MTA for smapd's exit-code matrix (tests only).

A real MTA cannot be made to return each sysexits code on demand, so this
script plays `sendmail`: it records its argv and stdin in DIR and exits
with a chosen code.  Usage as smapd's `sendmail` attribute:

    sendmail /path/python /path/recording_mta.py DIR [DEFAULT-CODE]

smapd appends `-oi -f SENDER -- RCPT…`.  A recipient whose local part is
`exitNN` makes it exit NN, `hang` makes it sleep (until killed), `slow…`
makes it take 3 seconds, `killed`
makes it kill itself with SIGKILL; otherwise it exits DEFAULT-CODE (0).
Each run writes DIR/RUN.argv (JSON list) and DIR/RUN.stdin, atomically.
"""

import json
import os
import signal
import sys
import time


def main(argv):
    directory = argv[1]
    code = int(argv[2]) if len(argv) > 2 and argv[2].isdigit() else 0
    rest = argv[3:] if len(argv) > 2 and argv[2].isdigit() else argv[2:]
    started = time.time()
    data = sys.stdin.buffer.read()
    run = "%.6f-%d" % (started, os.getpid())
    for name, content in (("stdin", data), ("argv", json.dumps(rest).encode())):
        temporary = os.path.join(directory, ".%s.%s" % (run, name))
        with open(temporary, "wb") as out:
            out.write(content)
        os.rename(temporary, os.path.join(directory, "%s.%s" % (run, name)))
    recipients = rest[rest.index("--") + 1:] if "--" in rest else []
    for recipient in recipients:
        local = recipient.split("@")[0]
        if local == "hang":
            time.sleep(3600)
        if local.startswith("slow"):
            time.sleep(3)
        if local == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        if local.startswith("exit") and local[4:].isdigit():
            code = int(local[4:])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
