"""Dropping privileges in one fixed order, and proving it worked.

chroot(directory), chdir("/"), setgroups([]), setgid(gid), setuid(uid), then
check that all three uids (real, effective, saved) and all three gids are
what was asked, that no supplementary group is left, and that neither
setuid(0) nor setgid(0) works any more.  Root's user and root's group are
refused as targets: either would make the drop a no-op.  Started as a non-root user, none of this is possible:
the caller is told (one warning in the log) and the program runs as the
invoking user, as DESIGN §7 allows.  The os module is a parameter so that
tests can record the order of the calls.
"""

import os


class PrivilegeError(Exception):
    """A step failed or root could be regained: the process must not go on."""


def drop(directory, uid, gid, chroot=True, osmod=os):
    """Jail and drop; returns False (changing nothing) when not started as root."""
    if osmod.geteuid() != 0:
        return False
    if chroot:
        osmod.chroot(directory)
        osmod.chdir("/")
    osmod.setgroups([])
    osmod.setgid(gid)
    osmod.setuid(uid)
    verify(uid, gid, osmod)
    return True


def verify(uid, gid, osmod=os):
    """Raise PrivilegeError unless the process is exactly uid/gid with no groups
    and can become neither root nor a member of root's group again."""
    if uid == 0:
        # `userid root` would make the whole drop a no-op: refuse it.
        raise PrivilegeError("refusing to run as root (userid 0)")
    if gid == 0:
        raise PrivilegeError("refusing to run with root's group (groupid 0)")
    if osmod.getresuid() != (uid, uid, uid):
        raise PrivilegeError("uids are %r, not %d" % (osmod.getresuid(), uid))
    if osmod.getresgid() != (gid, gid, gid):
        raise PrivilegeError("gids are %r, not %d" % (osmod.getresgid(), gid))
    if [g for g in osmod.getgroups() if g != gid]:
        raise PrivilegeError("supplementary groups remain: %r" % osmod.getgroups())
    for regain, what in ((osmod.setuid, "root"), (osmod.setgid, "root's group")):
        try:
            regain(0)
        except PermissionError:
            continue
        raise PrivilegeError("%s could be regained" % what)


def user_and_group(config):
    """(uid, gid, name) from the table's userid and groupid."""
    uid, gid, name = config.get("userid")
    if config.has("groupid"):
        gid = config.get("groupid")
    return uid, gid, name
