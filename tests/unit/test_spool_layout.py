"""spool.open_spool / make_dirs / install_spool (issue 11, finding 1): the
spool is uucp's, so root makes and chowns its entries on descriptors and
refuses a link, another type or a foreign owner with `PATH: reason`."""

import os
import stat

import pytest

from common import fsguard, spool

ROOT = os.geteuid() == 0
UUCP = 10
ENTRIES = (spool.TMP, spool.QUEUE, spool.STATE, spool.BAD)


def needs_root():
    if not ROOT:
        pytest.skip("needs root to chown")


def test_the_layout_is_given_to_the_user_through_descriptors(tmp_path):
    needs_root()
    root = tmp_path / "spool"
    os.close(spool.open_spool(str(root), UUCP, UUCP, own_top=True))
    assert os.lstat(root).st_uid == UUCP
    for name in ENTRIES:
        info = os.lstat(root / name)
        assert stat.S_ISDIR(info.st_mode) and info.st_uid == UUCP
        assert stat.S_IMODE(info.st_mode) == 0o700
    info = os.lstat(root / spool.TRIGGER)
    assert stat.S_ISFIFO(info.st_mode) and info.st_uid == UUCP


def test_make_dirs_leaves_the_top_to_its_owner(tmp_path):
    needs_root()
    root = tmp_path / "spool"
    spool.make_dirs(str(root), UUCP, UUCP)
    assert os.lstat(root).st_uid == 0 and os.lstat(root / spool.QUEUE).st_uid == UUCP


@pytest.mark.parametrize("name", ENTRIES + (spool.TRIGGER,))
def test_a_link_in_place_of_an_entry_is_refused_and_not_followed(tmp_path, name):
    needs_root()
    root = tmp_path / "spool"
    spool.make_dirs(str(root), UUCP, UUCP)
    target = tmp_path / "roots"
    target.write_text("secret\n")
    os.chmod(target, 0o600)
    path = root / name
    if stat.S_ISDIR(os.lstat(path).st_mode):
        os.rmdir(path)
    else:
        os.unlink(path)
    path.symlink_to(target)
    with pytest.raises(fsguard.UnsafePath, match="^%s: is a symbolic link" % path):
        spool.make_dirs(str(root), UUCP, UUCP)
    info = os.stat(target)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o600)


def test_a_foreign_owner_or_a_wrong_type_is_refused(tmp_path):
    needs_root()
    root = tmp_path / "spool"
    spool.make_dirs(str(root), UUCP, UUCP)
    os.chown(root / spool.STATE, 65534, 65534)
    with pytest.raises(fsguard.UnsafePath, match="state: owned by uid 65534"):
        spool.make_dirs(str(root), UUCP, UUCP)
    os.chown(root / spool.STATE, UUCP, UUCP)
    os.unlink(root / spool.TRIGGER)
    (root / spool.TRIGGER).write_text("")
    with pytest.raises(fsguard.UnsafePath, match=r"\.trigger: not a FIFO"):
        spool.make_dirs(str(root), UUCP, UUCP)
    os.unlink(root / spool.TRIGGER)
    os.chown(root, 65534, 65534)
    with pytest.raises(fsguard.UnsafePath, match="%s: owned by uid 65534" % root):
        spool.make_dirs(str(root), UUCP, UUCP)


def test_install_spool_resets_modes_and_refuses_links(tmp_path, capsys):
    root = tmp_path / "var" / "spool" / "smap"
    assert spool.install_spool(str(root), "uucp") == 0
    assert stat.S_IMODE(os.lstat(root).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(tmp_path / "var").st_mode) & 0o055 == 0o055
    os.chmod(root / spool.QUEUE, 0o755)
    assert spool.install_spool(str(root), "uucp") == 0
    assert stat.S_IMODE(os.lstat(root / spool.QUEUE).st_mode) == 0o700
    os.rmdir(root / spool.BAD)
    (root / spool.BAD).symlink_to(tmp_path)
    capsys.readouterr()
    assert spool.install_spool(str(root), "uucp") == 1
    assert capsys.readouterr().err == "make install: %s/bad: is a symbolic link, not a directory\n" % root
