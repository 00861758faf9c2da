"""common.privs: chroot, chdir /, setgroups([]), setgid, setuid in that order,
then proof that root cannot be regained; a recording fake os module stands
in for the real one."""

import pytest

from common import privs


class FakeOs:
    """Records calls; behaves like the kernel for one process."""

    def __init__(self, euid=0, keep_root=False, keep_groups=False, keep_setgid=False):
        self.calls = []
        self.uids = [euid] * 3
        self.gids = [0] * 3
        self.groups = [0, 4, 24]
        self.keep_root = keep_root          # a broken setuid that keeps saved uid 0
        self.keep_groups = keep_groups      # a broken setgroups
        self.keep_setgid = keep_setgid      # CAP_SETGID left behind (a capability bug)

    def geteuid(self):
        return self.uids[1]

    def chroot(self, path):
        self.calls.append(("chroot", path))

    def chdir(self, path):
        self.calls.append(("chdir", path))

    def setgroups(self, groups):
        self.calls.append(("setgroups", list(groups)))
        if not self.keep_groups:
            self.groups = list(groups)

    def setgid(self, gid):
        self.calls.append(("setgid", gid))
        if self.uids[1] != 0 and gid not in self.gids and not self.keep_setgid:
            raise PermissionError(1, "Operation not permitted")
        self.gids = [gid] * 3

    def setuid(self, uid):
        self.calls.append(("setuid", uid))
        if 0 not in self.uids:
            raise PermissionError(1, "Operation not permitted")
        self.uids = [uid, uid, 0 if self.keep_root else uid]
        if self.keep_root and uid == 0:
            self.uids = [0, 0, 0]

    def getresuid(self):
        return tuple(self.uids)

    def getresgid(self):
        return tuple(self.gids)

    def getgroups(self):
        return list(self.groups)


def test_order_of_the_drop():
    fake = FakeOs()
    assert privs.drop("/var/spool/smap", 10, 10, osmod=fake) is True
    assert fake.calls == [("chroot", "/var/spool/smap"), ("chdir", "/"), ("setgroups", []),
                          ("setgid", 10), ("setuid", 10), ("setuid", 0), ("setgid", 0)]
    assert fake.getresuid() == (10, 10, 10) and fake.getgroups() == []


def test_without_chroot_the_rest_is_the_same():
    fake = FakeOs()
    privs.drop("/unused", 10, 20, chroot=False, osmod=fake)
    assert [c[0] for c in fake.calls] == ["setgroups", "setgid", "setuid", "setuid", "setgid"]


def test_not_root_changes_nothing():
    fake = FakeOs(euid=1000)
    assert privs.drop("/var/spool/smap", 10, 10, osmod=fake) is False
    assert fake.calls == []


def test_verify_raises_when_root_can_be_regained():
    fake = FakeOs(keep_root=True)
    with pytest.raises(privs.PrivilegeError):
        privs.drop("/var/spool/smap", 10, 10, osmod=fake)


def test_verify_raises_when_groups_remain():
    fake = FakeOs(keep_groups=True)
    with pytest.raises(privs.PrivilegeError, match="supplementary groups remain"):
        privs.drop("/var/spool/smap", 10, 10, osmod=fake)


def test_verify_raises_on_wrong_ids():
    fake = FakeOs()
    fake.uids, fake.gids, fake.groups = [10, 10, 10], [10, 10, 11], []
    with pytest.raises(privs.PrivilegeError, match="gids"):
        privs.verify(10, 10, fake)
    fake.gids = [10, 10, 10]
    with pytest.raises(privs.PrivilegeError, match="uids"):
        privs.verify(11, 10, fake)


def test_verify_regained_root_check_and_refusing_uid_zero():
    fake = FakeOs()
    fake.uids, fake.gids, fake.groups = [10, 10, 0], [10, 10, 10], []
    with pytest.raises(privs.PrivilegeError):
        privs.verify(10, 10, fake)
    with pytest.raises(privs.PrivilegeError, match="root"):
        privs.verify(0, 0, FakeOs())


def test_verify_refuses_root_group_and_a_regainable_group():
    with pytest.raises(privs.PrivilegeError, match="root's group"):
        privs.drop("/var/spool/smap", 10, 0, osmod=FakeOs())
    with pytest.raises(privs.PrivilegeError, match="root's group could be regained"):
        privs.drop("/var/spool/smap", 10, 10, osmod=FakeOs(keep_setgid=True))
    fake = FakeOs()
    fake.uids, fake.gids, fake.groups = [10, 10, 10], [10, 10, 0], []
    with pytest.raises(privs.PrivilegeError, match="gids"):
        privs.verify(10, 10, fake)


def test_user_and_group_from_the_table():
    from common import netperm
    config = netperm.parse("smap: userid uucp\nsmap: groupid 4242\n", "t", "smap")
    uid, gid, name = privs.user_and_group(config)
    assert name == "uucp" and gid == 4242
