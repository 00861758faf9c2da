"""What a live process holds open, read from /proc (issue 11, finding 5).

`descriptors(pid)` is {fd: target} from /proc/PID/fd ("socket:[INODE]",
"/dev/null", "pipe:[INODE]", "anon_inode:[eventpoll]"...);
`listening_sockets()` the inodes of every socket in the LISTEN state
(/proc/net/tcp, tcp6, and unix sockets with __SO_ACCEPTCON), that is every
socket on which accept() would succeed; `unix_peers()` maps each unix
socket's inode to its peer's (`ss -xan`, the kernel's sock_diag), and
`holders(inode)` says which processes hold a socket.  `labelled(pid, names)`
turns a process's descriptors into a sorted list of names for an exact
comparison with what the design allows.

Read-only; it trusts /proc and ss(8) of the machine it runs on.
"""

import os
import subprocess

ACCEPTCON = 0x10000             # __SO_ACCEPTCON in /proc/net/unix's Flags: listen() was called
TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"


def descriptors(pid):
    """{fd: target} of pid (a descriptor closed while we read is left out)."""
    found = {}
    directory = "/proc/%d/fd" % pid
    for name in os.listdir(directory):
        try:
            found[int(name)] = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
    return found


def socket_inode(target):
    """INODE of "socket:[INODE]", else None."""
    if target.startswith("socket:[") and target.endswith("]"):
        return int(target[len("socket:["):-1])
    return None


def sockets_of(pid):
    return {inode for inode in map(socket_inode, descriptors(pid).values()) if inode}


def _tcp_rows():
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    yield row.split()
        except FileNotFoundError:
            continue


def _port(address):
    return int(address.rsplit(":", 1)[1], 16)


def listening_sockets():
    """Inodes of every listening TCP (v4, v6) and unix socket."""
    found = {int(row[9]) for row in _tcp_rows() if row[3] == TCP_LISTEN}
    with open("/proc/net/unix") as rows:
        next(rows)
        for row in rows:
            fields = row.split()
            if int(fields[3], 16) & ACCEPTCON:
                found.add(int(fields[6]))
    return found


def server_side_of(local_port, remote_port):
    """The inode of the established TCP socket local_port <- remote_port
    (the server's end of a client's connection), or None."""
    for row in _tcp_rows():
        if row[3] == TCP_ESTABLISHED and _port(row[1]) == local_port \
                and _port(row[2]) == remote_port:
            return int(row[9])
    return None


def unix_peers():
    """{inode: peer inode} of every connected unix socket."""
    out = subprocess.run(["ss", "-xanH"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    peers = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[5].isdigit() and fields[7].isdigit() and fields[7] != "0":
            peers[int(fields[5])] = int(fields[7])
    return peers


def unix_path_inode(path):
    """The inode of the unix socket bound at path (from /proc/net/unix)."""
    with open("/proc/net/unix") as rows:
        next(rows)
        for row in rows:
            fields = row.split()
            if len(fields) >= 8 and fields[7] == str(path):
                return int(fields[6])
    return None


def holders(inode):
    """pids of the processes that hold socket inode."""
    target = "socket:[%d]" % inode
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if target in descriptors(int(entry)).values():
                found.append(int(entry))
        except OSError:
            continue
    return sorted(found)


def labelled(pid, names, peers=None):
    """The sorted names of pid's descriptors: `names` maps a target
    ("socket:[N]", "/dev/null") or, for a unix socket, "peer:N" (N its
    peer's inode) or "peer-of:PID" (its peer is held by PID) to a name;
    anything else keeps its raw target, so an unexpected descriptor shows
    in the comparison."""
    peers = unix_peers() if peers is None else peers
    result = []
    for target in descriptors(pid).values():
        inode = socket_inode(target)
        name = names.get(target)
        if name is None and inode in peers:
            peer = peers[inode]
            name = names.get("peer:%d" % peer)
            if name is None:
                for holder in holders(peer):
                    name = names.get("peer-of:%d" % holder)
                    if name:
                        break
        result.append(name or target)
    return sorted(result)
