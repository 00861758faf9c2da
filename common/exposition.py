"""Prometheus' text exposition format, written atomically (issue 16): what
smapd's and pop3-gw's `metrics-file` share.

`write_atomically` makes NAME.tmp afresh inside an open directory (never
following a link: a leftover or planted entry of that name is removed
first, then created with O_EXCL | O_NOFOLLOW), writes, fsyncs and fchmods
it, renames it over NAME and fsyncs the directory, so node_exporter's
textfile collector (which reads only `*.prom`) sees the old file or the
new one, never half of one.  `escape` makes a label value of any text.
Nothing here reads a file or trusts one.
"""

import os


def write_atomically(dir_fd, name, data, mode):
    """Replace name in dir_fd by data (mode whatever the umask)."""
    temporary = name + ".tmp"
    try:
        os.unlink(temporary, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def escape(value):
    """A label value of the text format: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value):
    """A sample value: whole numbers as they are, others to the millisecond."""
    if isinstance(value, int):
        return "%d" % value
    return ("%.3f" % value).rstrip("0").rstrip(".")


def family(name, kind, text, samples):
    """The lines of one metric family: HELP, TYPE, then (labels, value) samples;
    labels is the text between the braces ("" for none)."""
    lines = ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
    for labels, value in samples:
        lines.append("%s%s %s" % (name, "{%s}" % labels if labels else "", number(value)))
    return lines
