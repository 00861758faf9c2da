"""smapd.control's files in the spool (issue 11, finding 1): the lock, the
pid file and baddir, worked on through the spool's descriptor, never
through a link that uucp could have planted."""

import os
import stat

import pytest

from common import fsguard, spool
from smapd import control

OWNERS = control.spool_owners(os.geteuid())


@pytest.fixture
def spool_fd(tmp_path):
    fd = fsguard.open_directory(str(tmp_path))
    yield fd
    os.close(fd)


def test_read_pid_takes_a_regular_file_only(tmp_path, spool_fd):
    assert control.read_pid(spool_fd, OWNERS) is None
    (tmp_path / control.PIDFILE).write_text("1234\n")
    assert control.read_pid(spool_fd, OWNERS) == 1234
    os.unlink(tmp_path / control.PIDFILE)
    target = tmp_path / "elsewhere"
    target.write_text("99\n")
    (tmp_path / control.PIDFILE).symlink_to(target)
    assert control.read_pid(spool_fd, OWNERS) is None
    os.unlink(tmp_path / control.PIDFILE)
    os.mkfifo(tmp_path / control.PIDFILE)           # must not block
    assert control.read_pid(spool_fd, OWNERS) is None


def test_write_pidfile_removes_what_was_planted_at_its_temporary_name(tmp_path):
    target = tmp_path / "roots"
    target.write_text("keep\n")
    (tmp_path / ("%s.%d" % (control.PIDFILE, os.getpid()))).symlink_to(target)
    control.write_pidfile(str(tmp_path))
    assert target.read_text() == "keep\n"
    assert (tmp_path / control.PIDFILE).read_text() == "%d\n" % os.getpid()
    assert not os.path.lexists(tmp_path / ("%s.%d" % (control.PIDFILE, os.getpid())))


def test_the_lock_is_a_regular_file_with_one_link(tmp_path, spool_fd):
    fd = control.take_lock(spool_fd, str(tmp_path), OWNERS)
    with pytest.raises(control.AlreadyRunning):
        control.take_lock(spool_fd, str(tmp_path), OWNERS)
    assert control.lock_is_held(spool_fd, str(tmp_path), OWNERS)
    os.close(fd)
    assert not control.lock_is_held(spool_fd, str(tmp_path), OWNERS)
    os.link(tmp_path / spool.LOCK, tmp_path / "second-name")
    with pytest.raises(fsguard.UnsafePath, match=r"\.smapd\.lock: has 2 hard links"):
        control.take_lock(spool_fd, str(tmp_path), OWNERS)


def test_baddir_is_made_inside_the_spool_without_links(tmp_path, spool_fd):
    control.make_baddir(spool_fd, str(tmp_path), str(tmp_path / "held" / "deeper"), None, None)
    assert stat.S_ISDIR(os.lstat(tmp_path / "held" / "deeper").st_mode)
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    with pytest.raises(fsguard.UnsafePath, match="linked: is a symbolic link"):
        control.make_baddir(spool_fd, str(tmp_path), str(tmp_path / "linked" / "bad"), None, None)
    assert os.listdir(elsewhere) == []
