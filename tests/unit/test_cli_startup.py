"""common.cli's start-up errors without processes: parse_listen's answers,
the one line of cli.program for each kind of failure, and the pid file
checks of common.skeleton."""

import errno
import io
import os
import sys

import pytest

from common import cli, skeleton


@pytest.mark.parametrize("text, expected", [
    ("25", ("0.0.0.0", 25)),
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("127.0.0.1", ("127.0.0.1", 25)),
    ("[::1]:2525", ("::1", 2525)),
    ("[::1]", ("::1", 25)),
    ("[::]:65535", ("::", 65535)),
])
def test_parse_listen_accepts(text, expected):
    assert cli.parse_listen(text, 25) == expected


@pytest.mark.parametrize("text, why", [
    ("::1:25", "(use [::1]:25)"),
    ("::1", "(use [::1]:25)"),
    ("fe80::1:2525", "(use [fe80::1]:2525)"),
    ("127.0.0.1:notaport", "(the port must be a number)"),
    ("127.0.0.1:", "(the port must be a number)"),
    ("127.0.0.1:70000", "(the port must be 1 to 65535)"),
    ("0", "(the port must be 1 to 65535)"),
    ("99999", "(the port must be 1 to 65535)"),
    ("127.0.0.1:-5", "(the port must be a number)"),
    ("127.0.0.1:\u00b2", "(the port must be a number)"),
    (":25", "(no address before the colon; use 0.0.0.0:25 or just 25)"),
    ("", "(give [ADDR:]PORT)"),
    ("[::1]x25", "(only :PORT may follow ])"),
    ("[::1]25", "(only :PORT may follow ])"),
    ("[::1:25", "(no ] after the IPv6 address)"),
    ("[]:25", "(not an IPv6 address in [ ])"),
    ("[127.0.0.1]:25", "(not an IPv6 address in [ ])"),
    ("localhost:25", "(ADDR must be a dotted quad or an [IPv6] address, or give just a PORT)"),
    ("127.1:25", "(ADDR must be a dotted quad or an [IPv6] address, or give just a PORT)"),
    ("1:2:3", "(an IPv6 address goes in brackets: [ADDR]:PORT)"),
])
def test_parse_listen_refuses_with_a_reason(text, why):
    with pytest.raises(cli.StartupError) as caught:
        cli.parse_listen(text, 25)
    assert str(caught.value) == "--daemon: bad address %r %s" % (text, why)
    assert caught.value.status == 2


def test_the_issue_example():
    with pytest.raises(cli.StartupError) as caught:
        cli.parse_listen("::1:25", 25)
    assert "smap: %s" % caught.value == "smap: --daemon: bad address '::1:25' (use [::1]:25)"


def run_program(body, argv, refuse=None):
    """(status, stderr text) of a cli.program-decorated body."""
    stderr, saved = io.StringIO(), sys.stderr
    sys.stderr = stderr
    try:
        status = cli.program("prog", "usage: prog\n", refuse)(body)(argv)
    finally:
        sys.stderr = saved
    return status, stderr.getvalue()


def raising(err):
    def body(argv):
        raise err
    return body


@pytest.mark.parametrize("err, status, text", [
    (cli.StartupError("T:3: bad"), 1, "prog: T:3: bad\n"),
    (cli.StartupError("--daemon: bad", status=2), 2, "prog: --daemon: bad\n"),
    (cli.UsageError("option -x not recognized"), 2,
     "prog: option -x not recognized\nusage: prog\n"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"), 1,
     "prog: /x/y: No such file or directory\n"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 1,
     "prog: /a: /b: Invalid cross-device link\n"),
])
def test_program_turns_errors_into_one_line(err, status, text):
    assert run_program(raising(err), ["--daemon", "1"]) == (status, text)


def test_program_unforeseen_error_is_one_line_that_says_where():
    status, text = run_program(raising(KeyError("k")), ["--daemon", "1"])
    assert status == 1 and text.count("\n") == 1
    assert text.startswith("prog: internal error: KeyError: 'k' (at ") and __file__ in text


def test_program_leaves_exit_and_status_alone():
    assert run_program(lambda argv: 3, ["--daemon", "1"]) == (3, "")
    with pytest.raises(SystemExit):
        run_program(raising(SystemExit(0)), ["--daemon", "1"])


def test_program_under_inetd_refuses_and_writes_nothing(monkeypatch):
    silenced, refused = [], []
    monkeypatch.setattr(skeleton, "silence_stderr", lambda: silenced.append(True))

    def refuse(reason):
        refused.append(reason)
        return 1
    assert run_program(raising(cli.StartupError("T: cannot read")), [], refuse) == (1, "")
    assert run_program(raising(cli.UsageError("option --x not recognized")), ["--x"],
                       refuse) == (2, "")
    assert refused == ["T: cannot read", "usage: option --x not recognized"]
    assert silenced == [True, True]


def test_check_pidfile(tmp_path):
    path = tmp_path / "p.pid"
    skeleton.check_pidfile(str(path))                   # none: fine
    path.write_text("%d\n" % os.getppid())              # a live process
    with pytest.raises(cli.StartupError) as caught:
        skeleton.check_pidfile(str(path))
    assert str(caught.value) == "%s: already running as pid %d" % (path, os.getppid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    path.write_text("%d\n" % pid)                       # a dead one: removed
    skeleton.check_pidfile(str(path))
    assert not path.exists()
    path.write_text("junk\n")
    skeleton.check_pidfile(str(path))
    assert not path.exists()


def test_write_pidfile_in_a_missing_directory(tmp_path):
    path = tmp_path / "no-such-dir" / "p.pid"
    with pytest.raises(cli.StartupError) as caught:
        skeleton.write_pidfile(str(path))
    assert str(caught.value) == "%s: No such file or directory" % path


def test_listen_on_a_busy_port():
    holder = skeleton.listen("127.0.0.1", 0)
    try:
        port = holder.getsockname()[1]
        with pytest.raises(cli.StartupError) as caught:
            skeleton.listen("127.0.0.1", port, name="--daemon 127.0.0.1:%d" % port)
        assert str(caught.value) == "--daemon 127.0.0.1:%d: Address already in use" % port
        with pytest.raises(cli.StartupError) as caught:
            skeleton.listen("127.0.0.1", port)
        assert str(caught.value) == "127.0.0.1:%d: Address already in use" % port
    finally:
        holder.close()


class RecordingLog:
    def __init__(self):
        self.lines = []

    def error(self, event, **fields):
        self.lines.append((event, fields))


def test_daemonize_failure_before_the_fork_is_one_line(monkeypatch, tmp_path):
    import daemon
    import daemon.daemon

    def fail(context):
        raise daemon.daemon.DaemonOSEnvironmentError("Unable to change working directory (x)")
    monkeypatch.setattr(daemon.DaemonContext, "open", fail)
    monkeypatch.setattr(skeleton, "detached", False)
    with pytest.raises(cli.StartupError) as caught:
        skeleton.daemonize(str(tmp_path / "p.pid"), logger=RecordingLog())
    assert str(caught.value) == "cannot detach: Unable to change working directory (x)"
    assert skeleton.detached is False       # still attached: the terminal sees the line


def test_daemonize_failure_after_the_fork_is_logged(monkeypatch, tmp_path):
    """python-daemon takes its pid file lock in the detached process, where
    stderr is /dev/null: the one line goes to the log as well."""
    import daemon
    import lockfile
    real_getpid = os.getpid

    def fail(context):      # as if in the detached grandchild: another pid
        monkeypatch.setattr(os, "getpid", lambda: real_getpid() + 1)
        raise lockfile.AlreadyLocked("%s is already locked" % (tmp_path / "p.pid"))
    monkeypatch.setattr(daemon.DaemonContext, "open", fail)
    monkeypatch.setattr(skeleton, "detached", False)
    monkeypatch.setattr(skeleton, "detached_log", None)
    logger = RecordingLog()
    stderr, saved = io.StringIO(), sys.stderr
    sys.stderr = stderr
    try:
        def body(argv):
            skeleton.daemonize(str(tmp_path / "p.pid"), logger=logger)
        status = cli.program("prog", "usage\n")(body)(["--daemon", "1"])
    finally:
        sys.stderr = saved
        monkeypatch.setattr(os, "getpid", real_getpid)
    reason = "cannot detach: %s is already locked" % (tmp_path / "p.pid")
    assert status == 1 and stderr.getvalue() == "prog: %s\n" % reason
    assert logger.lines == [("abort", {"reason": reason})]
