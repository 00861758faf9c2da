#!/usr/bin/env python3
"""A stand-in MTA that fails with a chosen diagnostic on stderr (tests only).

It records its argv and stdin exactly as tests/integration/recording_mta.py
does (DIR/RUN.argv, DIR/RUN.stdin, written atomically), so the helpers of
tests/integration/smapd_helpers.py read its runs.  Usage as smapd's
`sendmail` attribute:

    sendmail /path/python /path/diagnostic_mta.py DIR

A recipient whose local part is a key of DIAGNOSTICS makes it write those
exact bytes on stderr and exit with their code (67, EX_NOUSER: a permanent
failure, so smapd bounces); any other recipient is delivered (exit 0).
"""

import json
import os
import sys
import time

DIAGNOSTICS = {
    "unknown-utf8": (67, "Empfänger unbekannt".encode("utf-8")),
    "unknown-latin1": (67, b"Empf\xe4nger unbekannt"),
    "unknown-binary": (67, b"\x00\x1b[31m\xff\xfe\r\nEmpf\xc3nger\x7f" + b"\xe4" * 5000),
}


def main(argv):
    directory = argv[1]
    rest = argv[2:]
    data = sys.stdin.buffer.read()
    run = "%.6f-%d" % (time.time(), os.getpid())
    for name, content in (("stdin", data), ("argv", json.dumps(rest).encode())):
        temporary = os.path.join(directory, ".%s.%s" % (run, name))
        with open(temporary, "wb") as out:
            out.write(content)
        os.rename(temporary, os.path.join(directory, "%s.%s" % (run, name)))
    recipients = rest[rest.index("--") + 1:] if "--" in rest else []
    for recipient in recipients:
        code, text = DIAGNOSTICS.get(recipient.split("@")[0], (0, b""))
        if code:
            sys.stderr.buffer.write(text)
            sys.stderr.buffer.flush()
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
