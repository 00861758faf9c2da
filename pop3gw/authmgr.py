"""authmgr: the administrator's tool for the pop3-gw APOP user database
(DESIGN §3, the seed's "user authentication entries").

    authmgr [-c TABLE] adduser USER [FULLNAME] | deluser USER |
            password [--stdin] USER | enable USER | disable USER |
            list | display USER | unblock ADDRESS

The database is the `authfile` of the netperm-table (common.authdb): every
change is made under its lock and written atomically, so two authmgr runs,
or authmgr and a running pop3-gw, never lose each other's changes; pop3-gw
notices the new file by itself.  `password` asks for the new APOP secret
twice ("Verify"); when the two differ nothing changes.  Secrets are never
printed.  `unblock` forgets the bad logins pop3-gw counted for one source
address (pop3gw.penalty) before `badsleep` would.  It trusts the
administrator who runs it, and checks names and secrets all the same.
"""

import getpass
import sys
import time

from common import authdb, cli, hostmatch
from pop3gw import penalty

USAGE = """usage: authmgr [-c TABLE] COMMAND ...
  adduser USER [FULLNAME]   create an entry (it needs a password before use)
  deluser USER              remove an entry
  password [--stdin] USER   set the APOP secret (asked twice; --stdin: one line)
  enable USER | disable USER
  list                      all users, one a line
  display USER              one user's entry (never the secret)
  unblock ADDRESS           forget the bad logins counted for this source
"""

PROGRAM = "authmgr"


class Refused(Exception):
    """The command cannot be done; the message says why."""


def when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "never"


def existing(users, name):
    if name not in users:
        raise Refused("no such user: %s" % name)
    return users[name]


def checked_name(name):
    if not authdb.valid_name(name):
        raise Refused("bad user name %r: letters, digits and . _ @ + - only, at most 64" % name)
    return name


def adduser(path, name, fullname=""):
    def change(users):
        if name in users:
            raise Refused("user %s exists" % name)
        users[name] = authdb.User(name, True, "", fullname=fullname)
    authdb.update(path, change)
    return "added %s; set a password with: authmgr password %s\n" % (name, name)


def deluser(path, name):
    authdb.update(path, lambda users: existing(users, name) and users.pop(name))
    return "deleted %s\n" % name


def set_enabled(path, name, enabled):
    def change(users):
        user = existing(users, name)
        user.enabled = enabled
        if enabled:
            user.bad, user.locked_until = 0, 0      # enabling also unlocks
    authdb.update(path, change)
    return "%s %s\n" % ("enabled" if enabled else "disabled", name)


def read_secret(from_stdin, stdin=None, ask=getpass.getpass):
    if from_stdin:
        line = (stdin or sys.stdin).readline(authdb.MAX_SECRET + 2)
        return line.rstrip("\r\n")
    first = ask("New APOP password: ")
    second = ask("Verify: ")
    if first != second:
        raise Refused("the passwords do not match; nothing changed")
    return first


def password(path, name, secret):
    if not authdb.valid_secret(secret):
        raise Refused("a password is 1 to %d printable characters" % authdb.MAX_SECRET)

    def change(users):
        user = existing(users, name)
        user.secret, user.bad, user.locked_until = secret, 0, 0
    authdb.update(path, change)
    return "password set for %s\n" % name


def listing(path):
    users, _ = authdb.load(path)
    lines = []
    for name in sorted(users):
        user = users[name]
        state = "enabled" if user.enabled else "disabled"
        if not user.secret:
            state += ",no-password"
        lines.append("%-24s %-28s last login %s  %s\n"
                     % (name, state, when(user.last_login), user.fullname))
    return "".join(lines)


def display(path, name):
    users, _ = authdb.load(path)
    user = existing(users, name)
    return ("user: %s\nname: %s\nstatus: %s\npassword: %s\nlast login: %s\n"
            % (user.name, user.fullname, "enabled" if user.enabled else "disabled",
               "set" if user.secret else "not set", when(user.last_login)))


def unblock(path, address):
    """Forget the bad logins counted for address's source (its IPv6 /64)."""
    if address != penalty.UNKNOWN and hostmatch.normalize_address(address) is None:
        raise Refused("bad address %r: an IPv4 or IPv6 address, or unknown" % address)
    key = penalty.source_key(address) if address != penalty.UNKNOWN else penalty.UNKNOWN
    try:
        cleared = penalty.Ledger(path, 1, 0).clear(key)
    except (OSError, penalty.PenaltyError) as err:
        raise Refused(str(err)) from None
    return "%s %s\n" % ("unblocked" if cleared else "no bad logins counted for", key)


def run(path, args, stdin=None, ask=getpass.getpass):
    """The output of one command; Refused or cli.UsageError when it cannot run."""
    if not args:
        raise cli.UsageError("no command")
    command, rest = args[0], args[1:]
    if command == "list" and not rest:
        return listing(path)
    if command == "adduser" and len(rest) in (1, 2):
        return adduser(path, checked_name(rest[0]), rest[1] if len(rest) == 2 else "")
    if command == "password":
        from_stdin = rest[:1] == ["--stdin"]
        rest = rest[1:] if from_stdin else rest
        if len(rest) == 1:
            name = checked_name(rest[0])
            existing(authdb.load(path)[0], name)     # before asking for a secret
            return password(path, name, read_secret(from_stdin, stdin, ask))
    if command == "unblock" and len(rest) == 1:
        return unblock(path, rest[0])
    if len(rest) == 1 and command in ("deluser", "enable", "disable", "display"):
        name = checked_name(rest[0])
        if command == "deluser":
            return deluser(path, name)
        if command == "display":
            return display(path, name)
        return set_enabled(path, name, command == "enable")
    raise cli.UsageError("bad command or arguments: %s" % " ".join(args))


@cli.program(PROGRAM, USAGE)
def main(argv=None):
    """cli.program turns a start-up error into one line `authmgr: reason`
    (a UsageError: that line and the usage text)."""
    argv = sys.argv[1:] if argv is None else argv
    # options end where the command begins (a password may start with '-')
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")
                  and (i == 0 or argv[i - 1] not in ("-c", "--config"))), len(argv))
    options = cli.parse(argv[:split], USAGE)
    config = cli.load_or_die(options, PROGRAM, sys.stderr)
    try:
        sys.stdout.write(run(config.get("authfile"), argv[split:]))
    except (Refused, authdb.AuthDbError) as err:
        sys.stderr.write("authmgr: %s\n" % err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
