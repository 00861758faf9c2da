"""common.fsguard: no link followed, owners and modes checked after opening."""

import os
import stat

import pytest

from common import fsguard

ROOT = os.geteuid() == 0


def test_open_directory_walks_without_links(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    fd = fsguard.open_directory(str(real))
    try:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    with pytest.raises(fsguard.UnsafePath, match="link: is a symbolic link, not a directory"):
        fsguard.open_directory(str(tmp_path / "link"))
    (real / "sub").mkdir()
    with pytest.raises(fsguard.UnsafePath, match="is a symbolic link"):
        fsguard.open_directory(str(tmp_path / "link" / "sub"))
    missing = pytest.raises(fsguard.UnsafePath, match="does not exist")
    with missing as caught:
        fsguard.open_directory(str(tmp_path / "absent" / "x"))
    assert caught.value.missing


def test_a_directory_others_may_write_on_the_way_is_refused_unless_sticky(tmp_path):
    open_dir = tmp_path / "open"
    (open_dir / "inner").mkdir(parents=True)
    os.chmod(open_dir, 0o777)
    with pytest.raises(fsguard.UnsafePath) as caught:
        fsguard.open_directory(str(open_dir / "inner"))
    assert str(caught.value) == "%s: writable by group or others (mode 0777)" % open_dir
    os.chmod(open_dir, 0o1777)
    os.close(fsguard.open_directory(str(open_dir / "inner")))


def test_the_last_directory_must_have_a_named_owner(tmp_path):
    if not ROOT:
        pytest.skip("needs root to give a directory away")
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, 10, 10)
    os.close(fsguard.open_directory(str(spool), owners=(0, 10)))
    with pytest.raises(fsguard.UnsafePath, match="owned by uid 10, not by root"):
        fsguard.open_directory(str(spool), owners=(0,))
    (spool / "deeper").mkdir()
    with pytest.raises(fsguard.UnsafePath, match="%s: owned by uid 10, not by root" % spool):
        fsguard.open_directory(str(spool / "deeper"), owners=(0, 10))


def test_trusted_files_are_regular_unshared_and_not_links(tmp_path):
    table = tmp_path / "table"
    table.write_text("x\n")
    os.chmod(table, 0o644)
    os.close(fsguard.open_trusted_file(str(table)))
    with pytest.raises(fsguard.UnsafePath, match="must be 0600"):
        fsguard.open_trusted_file(str(table), secret=True)
    os.chmod(table, 0o664)
    with pytest.raises(fsguard.UnsafePath, match=r"writable by group or others \(mode 0664\)"):
        fsguard.open_trusted_file(str(table))
    os.chmod(table, 0o600)
    (tmp_path / "link").symlink_to(table)
    with pytest.raises(fsguard.UnsafePath, match="link: is a symbolic link"):
        fsguard.open_trusted_file(str(tmp_path / "link"))
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(fsguard.UnsafePath, match="not a regular file"):
        fsguard.open_trusted_file(str(tmp_path / "fifo"))
    with pytest.raises(fsguard.UnsafePath) as caught:
        fsguard.open_trusted_file(str(tmp_path / "absent"))
    assert caught.value.missing


def test_entries_inside_an_opened_directory(tmp_path):
    dir_fd = fsguard.open_directory(str(tmp_path))
    try:
        fd = fsguard.ensure_directory(dir_fd, "queue", 0o700)
        os.close(fd)
        assert stat.S_IMODE(os.stat(tmp_path / "queue").st_mode) == 0o700
        (tmp_path / "bad").symlink_to(tmp_path / "queue")
        with pytest.raises(fsguard.UnsafePath, match="bad: is a symbolic link"):
            fsguard.ensure_directory(dir_fd, "bad", 0o700)
        fsguard.ensure_fifo(dir_fd, ".trigger", 0o600)
        assert stat.S_ISFIFO(os.lstat(tmp_path / ".trigger").st_mode)
        (tmp_path / ".other").symlink_to("/etc/passwd")
        with pytest.raises(fsguard.UnsafePath, match="is a symbolic link, not a FIFO"):
            fsguard.ensure_fifo(dir_fd, ".other", 0o600)
        fd = fsguard.open_regular(dir_fd, "lock", os.O_RDWR | os.O_CREAT)
        os.close(fd)
        os.link(tmp_path / "lock", tmp_path / "second-name")
        with pytest.raises(fsguard.UnsafePath, match="has 2 hard links"):
            fsguard.open_regular(dir_fd, "lock", os.O_RDWR)
        with pytest.raises(fsguard.UnsafePath, match="is a symbolic link"):
            fsguard.open_regular(dir_fd, ".other", os.O_RDONLY)
    finally:
        os.close(dir_fd)


def test_ownership_is_given_through_the_descriptor_never_through_a_link(tmp_path):
    if not ROOT:
        pytest.skip("needs root to chown")
    target = tmp_path / "target"
    target.mkdir()
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "queue").symlink_to(target)
    dir_fd = fsguard.open_directory(str(spool))
    try:
        with pytest.raises(fsguard.UnsafePath):
            fsguard.ensure_directory(dir_fd, "queue", 0o700, 10, 10)
        os.close(fsguard.ensure_directory(dir_fd, "tmp", 0o700, 10, 10))
    finally:
        os.close(dir_fd)
    assert os.stat(target).st_uid == 0
    assert os.stat(spool / "tmp").st_uid == 10


# -- open_fifo, ensure_fifo on descriptors, open_or_make_directory (issue 11, finding 1)

def test_open_fifo_opens_only_a_fifo_of_its_owners_with_one_link(tmp_path):
    os.mkfifo(tmp_path / ".trigger", 0o600)
    dir_fd = fsguard.open_directory(str(tmp_path))
    try:
        fd = fsguard.open_fifo(dir_fd, ".trigger", os.O_RDWR, shown="SPOOL/.trigger")
        try:
            assert stat.S_ISFIFO(os.fstat(fd).st_mode) and not os.get_blocking(fd)
        finally:
            os.close(fd)
        (tmp_path / "link").symlink_to(tmp_path / ".trigger")
        with pytest.raises(fsguard.UnsafePath, match="^SPOOL/link: is a symbolic link, not a FIFO$"):
            fsguard.open_fifo(dir_fd, "link", os.O_RDWR, shown="SPOOL/link")
        (tmp_path / "file").write_text("")
        with pytest.raises(fsguard.UnsafePath, match="file: not a FIFO"):
            fsguard.open_fifo(dir_fd, "file", os.O_RDONLY)
        os.link(tmp_path / ".trigger", tmp_path / "second-name")
        with pytest.raises(fsguard.UnsafePath, match="has 2 hard links"):
            fsguard.open_fifo(dir_fd, ".trigger", os.O_RDONLY)
        with pytest.raises(fsguard.UnsafePath) as caught:
            fsguard.open_fifo(dir_fd, "absent", os.O_RDONLY)
        assert caught.value.missing
        if ROOT:
            os.mkfifo(tmp_path / "foreign", 0o600)
            os.chown(tmp_path / "foreign", 65534, 65534)
            with pytest.raises(fsguard.UnsafePath, match="owned by uid 65534"):
                fsguard.open_fifo(dir_fd, "foreign", os.O_RDONLY, owners=(0, 10))
    finally:
        os.close(dir_fd)


def test_ensure_fifo_chowns_the_fifo_never_a_hard_linked_one(tmp_path):
    if not ROOT:
        pytest.skip("needs root to chown")
    elsewhere = tmp_path / "roots-fifo"
    os.mkfifo(elsewhere, 0o600)
    spool = tmp_path / "spool"
    spool.mkdir()
    os.link(elsewhere, spool / ".trigger")      # what uucp could plant without protected_hardlinks
    dir_fd = fsguard.open_directory(str(spool))
    try:
        with pytest.raises(fsguard.UnsafePath, match="has 2 hard links"):
            fsguard.ensure_fifo(dir_fd, ".trigger", 0o600, 10, 10)
        os.unlink(spool / ".trigger")
        fsguard.ensure_fifo(dir_fd, ".trigger", 0o600, 10, 10)
    finally:
        os.close(dir_fd)
    assert os.stat(elsewhere).st_uid == 0
    assert os.lstat(spool / ".trigger").st_uid == 10


def test_open_or_make_directory_makes_the_missing_part_only_under_checked_parents(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    fd = fsguard.open_or_make_directory(str(target), 0o700)
    os.close(fd)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755 & ~current_umask()
    os.close(fsguard.open_or_make_directory(str(target), 0o700))        # there already
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(fsguard.UnsafePath, match="link: is a symbolic link"):
        fsguard.open_or_make_directory(str(tmp_path / "link" / "new"))
    assert not (elsewhere / "new").exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(fsguard.UnsafePath, match="shared: writable by group or others"):
        fsguard.open_or_make_directory(str(shared / "new"))
    assert not (shared / "new").exists()


def test_open_or_make_directory_checks_the_last_directory_as_asked(tmp_path):
    last = tmp_path / "empty"
    last.mkdir()
    os.chmod(last, 0o777)
    with pytest.raises(fsguard.UnsafePath, match="empty: writable by group or others"):
        fsguard.open_or_make_directory(str(last), owners=fsguard.trusted_owners(),
                                       writable_last=False)
    os.close(fsguard.open_or_make_directory(str(last)))


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
