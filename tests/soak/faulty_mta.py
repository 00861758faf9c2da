#!/usr/bin/env python3
"""A fault switch in front of the real MTA, for the soak trials (tests only).

Usage as smapd's `sendmail` attribute:

    sendmail PYTHON faulty_mta.py MODEFILE REAL-MTA [ITS ARGS…]

smapd appends `-oi -f SENDER -- RCPT…`.  The first word of MODEFILE says
what happens to a delivery whose recipients include an address in
example.org (the soak's test recipients; bounces to the sender and notices
to the postmaster always go through):

    ok      exec the real MTA (Postfix's sendmail) with the same argv tail
    slow    sleep 2 s, then exec the real MTA (a window for kill -9)
    75, 67  exit with that code (EX_TEMPFAIL, EX_NOUSER) without delivering
    hang    sleep until killed (smapd's deliver-timeout must end it)

It is a stand-in only for what a real MTA cannot do on demand (return a
chosen code, or hang); every delivery that succeeds goes through the real
Postfix.  It trusts its argv and the mode file, nothing else.
"""

import os
import sys
import time


def main(argv):
    mode_file, real = argv[1], argv[2:]
    try:
        with open(mode_file) as source:
            mode = (source.read().split() or ["ok"])[0]
    except OSError:
        mode = "ok"
    recipients = real[real.index("--") + 1:] if "--" in real else []
    if any(r.lower().endswith("@example.org") for r in recipients):
        if mode in ("75", "67"):
            sys.stdin.buffer.read()
            return int(mode)
        if mode == "hang":
            time.sleep(3600)
            return 75
        if mode == "slow":
            time.sleep(2)
    os.execv(real[0], real)
    return 71


if __name__ == "__main__":
    sys.exit(main(sys.argv))
